"""Replaying DistServe's real runs: the .exp parser, the figures, and a replay on a known cost."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tandem.sim.distserve import CHATBOT_OPT_13B
from tandem.sim.distserve_replay import Figures, RealRequest, compare, parse_run, render, replay
from tandem.sim.paper import deployments
from tests.unit.sim_doubles import StepCost


def _row(prompt: int, output: int, issue: float, ttft_ms: float, tpot_ms: float) -> str:
    return (
        f"{{'prompt_len': {prompt}, 'output_len': {output}, 'issue_time': {issue}, 'first_token_time': 0.0, "
        f"'complete_time': 0.0, 'ttft_ms': {ttft_ms}, 'tpot_ms': {tpot_ms}, 'latency_ms': 0.0}}"
    )


RUN = (
    "[" + ", ".join([_row(100, 3, 12.5, 300.0, 20.0), _row(50, 1, 10.0, 100.0, 0.0), _row(80, 5, 11.0, 200.0, 150.0)])
    + "]\n{\n\tnum_requests: 3\n\ttest_duration_ms: 1.0\n}\n"
)  # fmt: skip


def test_parse_run_orders_by_issue_time_and_never_evaluates_code() -> None:
    assert parse_run(RUN) == (
        RealRequest(0.0, 50, 1, 0.1, 0.0),
        RealRequest(1.0, 80, 5, 0.2, 0.15),
        RealRequest(2.5, 100, 3, 0.3, 0.02),
    )
    with pytest.raises(ValueError, match="malformed node"):
        parse_run("__import__('os').system('true')\n")


def test_figures_count_both_slos_and_skip_one_token_tpots() -> None:
    # TTFT 0.25 s and TPOT 0.1 s: the first meets both, the second misses TPOT, the third TTFT
    figures = Figures.of([0.1, 0.2, 0.3], [None, 0.15, 0.02], CHATBOT_OPT_13B)
    assert figures == Figures(0.2, pytest.approx(0.28), pytest.approx(0.085), pytest.approx(0.137), 1 / 3)


def test_replay_runs_the_real_arrivals_through_the_deployment() -> None:
    """vLLM's planner on a 10 ms step: the first request (prompt 50, 1 token) is prefilled at
    0-10 ms; the second, arriving at 1 s, at 1.00-1.01 s then decodes 4 steps; the third,
    arriving at 2.5 s, takes a prefill and 2 decode steps."""
    vllm, _ = deployments(CHATBOT_OPT_13B)
    figures = replay(parse_run(RUN), replace(vllm, cost=StepCost(0.01)), CHATBOT_OPT_13B)
    assert figures == Figures(pytest.approx(0.01), pytest.approx(0.01), pytest.approx(0.01), pytest.approx(0.01), 1.0)


def test_compare_replays_the_named_systems_only(tmp_path: Path) -> None:
    for name in ("vllm-3-2.exp", "distserve-c21d11-3-4.5.exp", "distserve-c21d12-3-4.exp", "distserve-3-1.exp"):
        (tmp_path / name).write_text(RUN)
    runs = compare(tmp_path)
    assert [(r.system, r.num_requests, r.rate_rps) for r in runs] == [("vllm", 3, 2.0), ("distserve-c21d11", 3, 4.5)]
    assert runs[0].real == Figures.of([0.1, 0.2, 0.3], [None, 0.15, 0.02], CHATBOT_OPT_13B)
    table = render(runs).splitlines()
    assert table[0] == (
        "| system | requests | rate (req/s) | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) | TPOT p90 (ms) "
        "| both SLOs met |"
    )
    assert table[2].startswith("| vllm | 3 | 2 | 200 / ")
    assert table[3].startswith("| distserve-c21d11 | 3 | 4.5 | 200 / ")
