"""`tandem simulate` and `tandem plan` on a trace file, end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.cli import main
from tandem.sim.traces import write_csv
from tandem.sim.types import TraceRequest


def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    write_csv(path, [TraceRequest(0.05 * i, 300 + 10 * i, 20) for i in range(40)])
    return path


def test_simulate_prints_the_report_and_writes_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["simulate", "--trace", str(trace_file(tmp_path)), "--num-prefill", "1", "--num-decode", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(out)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "## simulation: 1 prefill + 2 decode x 1 H100" in printed
    assert "| requests | 40 (40 completed, 0 failed) |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["latency_cdf.png", "report.md", "result.json"]


def test_plan_prints_the_cheapest_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--trace", str(trace_file(tmp_path)), "--max-gpus", "2", "--slo-ttft-s", "0.5"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    # one H100 serves 20 requests/s of 300-700 tokens within the SLOs: the colocated single worker
    assert "plan: 0 prefill + 1 decode;" in printed
    assert "gain over the best colocated configuration: 1.00x goodput per GPU" in printed


def test_simulate_needs_requests(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate"])
    assert exit_info.value.code == 2
    assert "give --trace (a trace file) or --workload (a workload YAML)" in capsys.readouterr().err
