"""The GPU check's runner and summary (`make gpu-check`), on CPU: every outcome a step can
have, the markdown summary byte for byte, and the whole script's skip path without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.loadtest.gpu.check import LOG_NAME, NO_CUDA, SUMMARY_NAME, check_main
from tandem.loadtest.gpu.report import Outcome, StepReport, Table, render_summary
from tandem.loadtest.gpu.steps import STEPS, Step

REPO = Path(__file__).resolve().parents[2]


def test_summary_markdown_is_exact() -> None:
    table = Table("decode", ("ctx", "GB/s"), (("1k", "900.1"), ("4k", "2|5")), ("goal: 75% of copy",))
    steps = [
        StepReport("kernels", "kernel bench", Outcome.PASSED, 12.34, 90.0, (table,)),
        StepReport("handoff", "KV hand-off", Outcome.SKIPPED, 0.0, 60.0, message="no CUDA device"),
        StepReport("cluster", "tandem up", Outcome.FAILED, 3.0, 150.0, message="exited with status 1\nboom"),
    ]
    summary = render_summary("GPU check on H100", [("GPU", "H100"), ("torch", "2.11")], steps)
    assert summary == (
        "## GPU check on H100\n\n- GPU: H100\n- torch: 2.11\n\n"
        "| step | outcome | time | limit |\n| --- | --- | --- | --- |\n"
        "| kernel bench | passed | 12.3 s | 90 s |\n| KV hand-off | skipped | 0.0 s | 60 s |\n"
        "| tandem up | failed | 3.0 s | 150 s |\n\n"
        "### 1. kernel bench: passed\n\n**decode**\n\n| ctx | GB/s |\n| --- | --- |\n| 1k | 900.1 |\n| 4k | 2\\|5 |\n\n"
        "- goal: 75% of copy\n\n"
        "### 2. KV hand-off: skipped\n\nno CUDA device\n\n"
        "### 3. tandem up: failed\n\n```\nexited with status 1\nboom\n```\n"
    )


def test_table_rejects_a_ragged_row() -> None:
    with pytest.raises(ValueError, match=r"table 't': row \('1',\) has 1 cells, expected 2"):
        Table("t", ("a", "b"), (("1",),))


def test_step_report_round_trips_through_json_dicts() -> None:
    report = StepReport("x", "X", Outcome.TIMED_OUT, 1.5, 2.0, (Table("t", ("a",), (("1",),), ("n",)),), "slow")
    assert StepReport.from_dict(report.to_dict()) == report


def _step(function: str, limit_s: float = 60.0) -> Step:
    return Step(function, f"step {function}", f"tests.unit.gpu_check_steps:{function}", limit_s)


def test_every_outcome_is_recorded_and_the_check_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the child processes import tests.unit.gpu_check_steps from here
    steps = [_step("passes"), _step("skips"), _step("raises"), _step("check_fails"), _step("hangs", 3.0)]
    printed: list[str] = []
    code = check_main(steps, tmp_path / "out", printed.append, have_cuda=True)
    assert code == 1
    summary = (tmp_path / "out" / SUMMARY_NAME).read_text()
    assert printed[-1] == summary
    overview = [line for line in summary.splitlines() if line.startswith("| step ") and "outcome" not in line]
    assert [line.split(" | ")[1] for line in overview] == ["passed", "skipped", "failed", "failed", "timed out"]
    assert "**figures**\n\n| case | GB/s |\n| --- | --- |\n| a | 1.5 |\n| b | 2.0 |\n\n- one note" in summary
    assert "### 2. step skips: skipped\n\nneeds two GPUs; this machine has one\n" in summary
    assert "RuntimeError: the kernel returned NaN\n```" in summary
    assert "exited with status 1; the end of its output:\nabout to fail\nTraceback" in summary
    assert "### 1. step passes: passed\n\n**figures**\n" in summary
    assert (
        "### 4. step check_fails: failed\n\n```\n2 of 3 requests differ from the engine\n```\n\n**figures**" in summary
    )
    assert "did not finish within its 3 s limit; the end of its output:\nhanging now\n```" in summary
    log = (tmp_path / "out" / LOG_NAME).read_text()
    assert "===== step hangs =====\nhanging now\n" in log


def test_without_cuda_every_step_skips_and_says_why(tmp_path: Path) -> None:
    printed: list[str] = []
    assert check_main(STEPS, tmp_path, printed.append, have_cuda=False) == 0
    summary = (tmp_path / SUMMARY_NAME).read_text()
    assert summary.startswith("## GPU check (no CUDA device)\n\n- GPU: none\n")
    for index, step in enumerate(STEPS, start=1):
        assert f"### {index}. {step.title}: skipped\n\n{NO_CUDA}\n" in summary
    assert summary.count("| skipped |") == len(STEPS) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the script")
def test_the_script_on_cpu_installs_nothing_and_skips_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(REPO / "deploy/gpu/check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "installing" not in done.stdout
    summary = (tmp_path / SUMMARY_NAME).read_text()
    assert done.stdout.endswith(summary + "\n")
    assert summary.count(NO_CUDA) == len(STEPS)
