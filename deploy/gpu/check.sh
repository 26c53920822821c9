#!/usr/bin/env bash
# `make gpu-check`: prove or disprove the GPU path in one call on a bare CUDA machine.
#
# On a machine with CUDA (the GPU image: python3 with torch, triton and transformers, no network)
# it installs the wheelhouse from `make gpu-wheels` (deploy/gpu/wheelhouse/, carried with the
# tree) with --no-index, and the project with --no-deps, into that Python; then it runs every
# step of `python -m tandem.loadtest.gpu check` under its own time limit and writes the summary
# into $OUT (if set) and stdout. Without CUDA nothing is installed and every step skips, saying
# why. GPU_CHECK_PYTHON picks the interpreter (default: python3, or the repo's .venv without CUDA).
set -uo pipefail
cd "$(dirname "$0")/../.."
wheelhouse=deploy/gpu/wheelhouse
py=${GPU_CHECK_PYTHON:-python3}

has_cuda() {
  "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

if has_cuda "$py"; then
  if ls "$wheelhouse"/*.whl >/dev/null 2>&1; then
    echo "gpu-check: installing $(ls "$wheelhouse"/*.whl | wc -l) wheels from $wheelhouse (--no-index)"
    "$py" -m pip install -q --no-index --no-deps --no-cache-dir "$wheelhouse"/*.whl || exit 2
  else
    echo "gpu-check: no wheels in $wheelhouse (run make gpu-wheels before, and carry that folder)" >&2
    exit 2
  fi
  echo "gpu-check: installing the project (--no-deps)"
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir . || exit 2
  # --no-deps skips pip's version checks: show any gap against the image's own packages (a
  # report only; the steps say what actually breaks).
  "$py" -m pip check || echo "gpu-check: pip check found the conflicts above; going on"
  exec "$py" -m tandem.loadtest.gpu check "$@"
fi

# No CUDA: install nothing; run the check with an interpreter that has the project, so that
# every step reports its skip in the same summary.
if [ -z "${GPU_CHECK_PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  py=.venv/bin/python
fi
exec "$py" -m tandem.loadtest.gpu check "$@"
