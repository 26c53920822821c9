"""make bench's report: figures against goals, the BENCHMARKS.md text, and the suite's flags."""

from __future__ import annotations

import shutil

import pytest

from tandem.launcher.placement import pinned
from tandem.loadtest.suite.cluster import ClusterSpec, WorkerSpec
from tandem.loadtest.suite.figures import Direction, Figure, Section
from tandem.loadtest.suite.machine import MachineInfo
from tandem.loadtest.suite.markdown import render
from tandem.loadtest.suite.run import SECTIONS, parse_only

MACHINE = MachineInfo("Test CPU", 2, 24.0, "Linux 6", "3.11.7", "2.13.0+cpu", "abc1234", "none")


@pytest.mark.parametrize(
    ("value", "goal", "direction", "met", "verdict"),
    [
        (0.9, 0.85, Direction.AT_LEAST, True, "met"),
        (0.85, 0.85, Direction.AT_LEAST, True, "met"),
        (0.84, 0.85, Direction.AT_LEAST, False, "**missed**"),
        (1.3, 1.3, Direction.AT_MOST, True, "met"),
        (1.31, 1.3, Direction.AT_MOST, False, "**missed**"),
        (7.0, None, Direction.AT_LEAST, None, ""),
    ],
)
def test_a_figure_is_judged_against_its_goal(
    value: float, goal: float | None, direction: Direction, met: bool | None, verdict: str
) -> None:
    figure = Figure("f", value, goal=goal, direction=direction)
    assert (figure.met, figure.verdict()) == (met, verdict)


def test_a_figure_must_be_finite() -> None:
    with pytest.raises(ValueError, match="figure 'ratio' is not a finite number: nan"):
        Figure("ratio", float("nan"))


def test_the_report_lists_every_figure_and_states_misses_and_failures() -> None:
    ok = Section(
        "kv",
        "KV hand-off",
        "64 MiB pulls.",
        (Figure("grpc / raw TCP", 0.35, goal=0.4), Figure("torch / raw TCP", 0.75, goal=0.7)),
        (("path", "MB/s"), ("grpc", "700")),
        duration_s=12.0,
    )
    latency = Section(
        "gateway",
        "Scheduler",
        "64 workers.",
        (Figure("route p99", 250.0, unit=" us", goal=200.0, direction=Direction.AT_MOST),),
        duration_s=3.0,
    )
    failed = Section("stack", "Full stack", "", error="Traceback...\nRuntimeError: boom")
    text = render([ok, latency, failed], MACHINE, "2026-11-21 08:00 UTC", 90.0, quick=False)
    assert "| KV hand-off | grpc / raw TCP | 0.350 | >= 0.4 | **missed** |" in text
    assert "| KV hand-off | torch / raw TCP | 0.750 | >= 0.7 | met |" in text
    assert "| Scheduler | route p99 | 250 us | <= 200 us | **missed** |" in text
    assert "| Full stack | (did not run to the end) | - | - | **failed** |" in text
    assert "Goals missed in this run: grpc / raw TCP (0.350, goal >= 0.4); route p99 (250 us, goal <= 200 us)." in text
    assert "Sections that failed: Full stack." in text
    assert "RuntimeError: boom" in text
    assert "| CPU | Test CPU, 2 cores available |" in text
    assert "| commit | abc1234 |" in text
    assert "Run started 2026-11-21 08:00 UTC, took 1.5 min." in text
    assert "Quick run" not in text
    assert "| grpc | 700 |" in text


def test_a_quick_report_says_its_figures_are_not_the_projects() -> None:
    text = render([], MACHINE, "2026-11-21 08:00 UTC", 1.0, quick=True)
    assert "**Quick run** (`--quick`)" in text
    assert "Goals missed" not in text


def test_only_selects_sections_in_run_order_and_names_unknown_ones() -> None:
    assert parse_only(None) == tuple(SECTIONS)
    assert parse_only("gateway, kv") == ("kv", "gateway")
    with pytest.raises(ValueError, match="--only takes a comma list of engine, kv, .*; got 'kv,nope'"):
        parse_only("kv,nope")
    with pytest.raises(ValueError, match="got ''"):
        parse_only("")


def test_cluster_specs_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="worker role must be prefill or decode, got 'gateway'"):
        WorkerSpec("gateway", 0)
    with pytest.raises(ValueError, match="a cluster needs at least one decode worker"):
        ClusterSpec(tmp_path, (WorkerSpec("prefill", 0),), gateway_cpu=1)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_processes_start_pinned_under_taskset() -> None:
    assert pinned(1, ["python", "-m", "tandem"]) == [shutil.which("taskset"), "-c", "1", "python", "-m", "tandem"]


def test_workers_get_the_ids_local_cluster_gives_them(tmp_path) -> None:
    spec = ClusterSpec(
        tmp_path,
        (WorkerSpec("prefill", 0), WorkerSpec("prefill", 1), WorkerSpec("decode", 0)),
        gateway_cpu=1,
        policy="round_robin",
        local_prefill_max_tokens=0,
    )
    assert spec.worker_cpus() == {"prefill-0": 0, "prefill-1": 1, "decode-0": 0}
    config = spec.config()
    scheduler = config.gateway.scheduler
    assert (config.num_prefill, config.num_decode, config.gateway.port) == (2, 1, 0)
    assert (scheduler.policy, scheduler.local_prefill_max_tokens, config.worker.engine.kv_cache_bytes) == (
        "round_robin",
        0,
        256 * 1024 * 1024,
    )
    assert sorted(worker_id for _, worker_id in config.worker_ids()) == sorted(spec.worker_cpus())
