"""`tandem simulate` and `tandem plan`: the simulator (`tandem.sim`) on a trace or a workload.

Flags are the fields of `SimulateConfig` / `PlanConfig`. The requests come from `--trace` (a
Mooncake, Azure or plain CSV trace, `tandem.sim.traces`) or from `--workload` (a load
generator workload YAML, drawn for `--seed` at `--rate-rps`). With `--out`, the report, the
result as JSON and the plots (PNG, matplotlib's Agg canvas, as the load generator draws them)
are written there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.common.options import add_flags, from_args

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tandem.sim.config import SimulateConfig
    from tandem.sim.plan import PlanResult
    from tandem.sim.results import Records
    from tandem.sim.types import TraceRequest

DPI = 100


def add_simulate_flags(parser: argparse.ArgumentParser) -> None:
    from tandem.sim.config import SimulateConfig

    add_flags(parser, SimulateConfig)
    parser.set_defaults(func=cmd_simulate)


def add_plan_flags(parser: argparse.ArgumentParser) -> None:
    from tandem.sim.config import PlanConfig

    add_flags(parser, PlanConfig)
    parser.set_defaults(func=cmd_plan)


def load_requests(config: SimulateConfig) -> tuple[TraceRequest, ...]:
    """The requests of `--trace` or `--workload` (ValueError when neither is given)."""
    if config.trace is not None:
        from tandem.sim.traces import read_trace

        return read_trace(config.trace, config.trace_format)
    if config.workload is None:
        raise ValueError("give --trace (a trace file) or --workload (a workload YAML)")
    from tandem.loadtest.sim_workloads import load_workload_trace

    return load_workload_trace(config.workload, config.num_requests, config.seed, config.rate_rps)


def cmd_simulate(args: argparse.Namespace) -> int:
    import time

    from tandem.sim.cluster import ClusterSim
    from tandem.sim.config import SimulateConfig
    from tandem.sim.results import render

    config: SimulateConfig = from_args(SimulateConfig, args)
    requests = load_requests(config)
    sim = ClusterSim(config.cluster(), config.cost_model(), requests)
    wall_s = time.perf_counter()
    result = sim.run()
    wall_s = time.perf_counter() - wall_s
    title = f"simulation: {config.num_prefill} prefill + {config.num_decode} decode x {config.tp} {config.gpu}"
    report = render(result, title)
    report += f"\n\nsimulated {result.makespan_s:.1f} s in {wall_s:.1f} s ({result.makespan_s / wall_s:.1f} x)"
    print(report)
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "report.md").write_text(report + "\n")
        (config.out / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
        write_latency_cdf(config.out / "latency_cdf.png", sim.records)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tandem.sim.config import PlanConfig
    from tandem.sim.plan import PlanSpec, plan, simulator

    config: PlanConfig = from_args(PlanConfig, args)
    base = config.simulate
    requests = load_requests(base)
    spec = PlanSpec(base.slo(), config.attainment, config.max_gpus, base.tp, config.price())
    result = plan(requests, spec, simulator(base.cluster(), base.cost_model()))
    report = render_plan(result, config.attainment)
    print(report)
    if base.out is not None:
        base.out.mkdir(parents=True, exist_ok=True)
        (base.out / "plan.md").write_text(report + "\n")
        write_goodput_vs_ratio(base.out / "goodput_vs_pd.png", result)
    return 0 if result.best is not None else 1


def render_plan(result: PlanResult, attainment: float) -> str:
    lines = [
        "| prefill | decode | SLO attainment | goodput at the trace's rate (req/s per worker) |",
        "|---|---|---|---|",
    ]
    for c in result.evaluated:
        good = (c.result.goodput_rps or 0.0) / c.num_workers
        lines.append(f"| {c.num_prefill} | {c.num_decode} | {c.attainment:.1%} | {good:.3f} |")
    lines.append("")
    for name, sizing in (("plan", result.best), ("colocated baseline", result.colocated)):
        if sizing is None:
            lines.append(f"{name}: nothing within the budget meets the SLOs for {attainment:.0%} of requests")
            continue
        c = sizing.candidate
        cost = "-" if sizing.cost_per_million_tokens_usd is None else f"${sizing.cost_per_million_tokens_usd:.3f}"
        lines.append(
            f"{name}: {c.num_prefill} prefill + {c.num_decode} decode; goodput {sizing.goodput_rps:.2f} req/s "
            f"({sizing.goodput_per_gpu:.3f} per GPU); {cost} per million output tokens"
        )
    if result.gain is not None:
        lines.append(f"gain over the best colocated configuration: {result.gain:.2f}x goodput per GPU")
    if result.best is not None and result.best.candidate.num_prefill:
        c = result.best.candidate
        ratio = c.num_prefill / c.num_decode
        lines.append(f"autoscaler: --planned-prefill-per-decode {ratio:g} follows this ratio as load changes")
    return "\n".join(lines)


def write_latency_cdf(path: Path, records: Records) -> Path:
    """Empirical CDFs of TTFT, ITL and e2e (ms) of the completed requests."""
    ttft, itl, e2e = records.summary_times()
    figure = _figure((1200, 400))
    for i, (title, values) in enumerate((("TTFT", ttft), ("ITL", itl), ("E2E", e2e))):
        axes = figure.add_subplot(1, 3, i + 1)
        ordered = sorted(v * 1000 for v in values)
        axes.step(ordered, [(j + 1) / len(ordered) for j in range(len(ordered))], where="post")
        axes.set_title(f"{title} (ms)")
        axes.set_ylabel("fraction of requests")
        axes.grid(True, alpha=0.3)
    return _save(figure, path)


def write_goodput_vs_ratio(path: Path, result: PlanResult) -> Path:
    """Goodput per worker at the trace's rate against the P:D ratio, one line per cluster size."""
    figure = _figure((900, 500))
    axes = figure.add_subplot(1, 1, 1)
    sizes = sorted({c.num_workers for c in result.evaluated})
    for n in sizes:
        points = [
            (c.num_prefill / c.num_decode, (c.result.goodput_rps or 0.0) / n)
            for c in result.evaluated
            if c.num_workers == n
        ]
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=f"{n} workers")
    axes.set_xlabel("prefill : decode workers (0: colocated)")
    axes.set_ylabel("goodput per worker (req/s)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _figure(size_px: Sequence[int]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path
