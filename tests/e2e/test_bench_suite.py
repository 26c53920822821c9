"""`python -m tandem.loadtest bench --quick`: the benchmark set runs to the end and writes its report.

Quick sizes measure nothing worth keeping; this checks that the suite itself works on a clean
machine (processes start pinned, figures come back, BENCHMARKS.md is rendered), so that
`make bench` does not rot between the runs that produce the committed figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_bench_writes_every_requested_section(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    env = {**os.environ, "HOME": str(tmp_path), "TANDEM_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "tandem.loadtest", "bench", "--quick", "--only", "kv,prefix_cache", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "**Quick run** (`--quick`)" in text
    assert "## KV hand-off vs raw loopback TCP" in text
    assert "## Prefix-cache TTFT speedup" in text
    assert "| KV hand-off vs raw loopback TCP | grpc / raw TCP |" in text
    assert "| raw tcp, shared cores | shared |" in text  # the same-host path's baseline, measured unpinned
    assert (
        "| Prefix-cache TTFT speedup | warm requests' prefix-cache hit rate (cached / prompt tokens) | 0.750 |" in text
    )
    assert "**failed**" not in text and "Sections that failed" not in text
    assert "## Engine vs transformers generate" not in text  # --only
