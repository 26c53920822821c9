"""`tandem simulate` and `tandem plan` on a trace file, end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.cli import main
from tandem.sim.calibrate import CalibratedCostModel, Coefficients, save
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


def test_simulate_with_a_calibrated_cost_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CPU cost model saved by `tandem.sim.calibrate` replaces the roofline: here a step costs
    1 ms + 0.1 ms per token, so a lone 40-token request's first token takes exactly 5 ms."""
    model = CalibratedCostModel("m", Coefficients(0.001, 1e-4, 0.0, 0.0, 0.0), kv_bytes=4096)
    save(model, tmp_path / "cost.json")
    trace = tmp_path / "one.csv"
    write_csv(trace, [TraceRequest(0.0, 40, 3)])
    argv = ["simulate", "--trace", str(trace), "--num-prefill", "0", "--num-blocks", "64"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--cost-model-file", str(tmp_path / "cost.json")])
    assert exit_info.value.code == 0
    # TTFT: the 40-token prefill step, 1 + 4 = 5 ms; then two decode steps of 1.1 ms each
    printed = capsys.readouterr().out
    assert "| TTFT p50 / p90 / p99 (ms) | 5.0 / 5.0 / 5.0 |" in printed
    assert "| ITL p50 / p90 / p99 (ms) | 1.1 / 1.1 / 1.1 |" in printed
