"""`python -m tandem.loadtest.gpu`: the GPU check's command line.

    python -m tandem.loadtest.gpu check [--out DIR] [--only tests,kernels,handoff,cluster]
    python -m tandem.loadtest.gpu step MODULE:FUNCTION --result FILE --work DIR   (one step, run by `check`)
    python -m tandem.loadtest.gpu wheels --dest deploy/gpu/wheelhouse  (`make gpu-wheels`)

`deploy/gpu/check.sh` (`make gpu-check`) installs the wheelhouse and the project, then runs
`check --out "$OUT"`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tandem.loadtest.gpu.check import check_main, step_main
from tandem.loadtest.gpu.steps import STEP_NAMES, STEPS, step_named


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.loadtest.gpu", description="The GPU check.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run every step and write the summary")
    check.add_argument("--out", type=Path, default=None, help="folder for the summary (default: $OUT if set)")
    check.add_argument("--only", default=None, help=f"comma-separated steps among {','.join(STEP_NAMES)}")
    step = commands.add_parser("step", help="run one step in this process (used by check)")
    step.add_argument("target", help="the step's function, module:function")
    step.add_argument("--result", type=Path, required=True)
    step.add_argument("--work", type=Path, required=True)
    # `wheels` has its own parser (tandem.loadtest.gpu.wheelhouse): its flags pass through.
    commands.add_parser("wheels", help="download the wheelhouse the GPU image lacks", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "wheels":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "check":
        steps = STEPS if args.only is None else tuple(step_named(n.strip()) for n in args.only.split(","))
        out = args.out if args.out is not None else (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        return check_main(steps, out)
    if args.command == "step":
        return step_main(args.target, args.result, args.work)
    from tandem.loadtest.gpu.wheelhouse import main as wheels_main

    return wheels_main(rest)


if __name__ == "__main__":
    sys.exit(main())
