"""Gateway SSE headroom and the scheduler's decision latency (`tandem bench gateway`).

Headroom: streaming tokens/s through the gateway over the same requests streamed straight
from the decode worker's gRPC API, at concurrency 32 (goal >= 0.85: the gateway costs at most
15% of what the worker can stream). Decision latency: `route` on 64 workers and a 4096-token
prompt, in memory (budget: p99 <= 200 us, DESIGN.md section 5).
"""

from __future__ import annotations

import statistics

from tandem.loadtest.bench.gateway import GOAL, measure_gateway
from tandem.loadtest.bench.scheduler import run_scheduler_bench
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Direction, Figure, Section

ROUTE_P99_BUDGET_US = 200.0


def run(ctx: BenchContext) -> Section:
    report = measure_gateway(
        ctx.model_dir, concurrency=ctx.size(32, 4), max_tokens=ctx.size(64, 8), rounds=ctx.size(7, 1)
    )
    lines: list[str] = []
    timings = run_scheduler_bench(iterations=ctx.size(5000, 100), out=lines.append)
    rows = [("path", "tokens/s (median)", "rounds")]
    for name, values in (
        ("direct to the decode worker (gRPC)", report.direct),
        ("through the gateway (HTTP SSE)", report.via_gateway),
    ):
        rows.append((name, f"{statistics.median(values):.0f}", ", ".join(f"{v:.0f}" for v in values)))
    rows.append(
        (
            "scheduler route p50 / p99 / max (us)",
            f"{timings['route_p50_us']:.0f} / {timings['route_p99_us']:.0f} / {timings['route_max_us']:.0f}",
            "",
        )
    )
    rows.append(("prefix match p50 / p99 (us)", f"{timings['match_p50_us']:.0f} / {timings['match_p99_us']:.0f}", ""))
    figures = (
        Figure("gateway / direct streaming tokens/s", report.ratio, goal=GOAL),
        Figure(
            "scheduler route p99",
            timings["route_p99_us"],
            unit=" us",
            goal=ROUTE_P99_BUDGET_US,
            direction=Direction.AT_MOST,
        ),
        Figure("scheduler route p50", timings["route_p50_us"], unit=" us"),
    )
    setup = (
        f"{report.concurrency} streams of {report.prompt_len}-token prompts, {report.max_tokens} tokens each, "
        "alternating rounds; decode worker alone on core 0 (one torch thread), gateway and clients on core 1. "
        "Scheduler: 64 workers, 4096-token prompt, prefix_aware policy, in memory."
    )
    return Section(
        "gateway",
        "Gateway SSE headroom and scheduler decision latency",
        setup,
        figures,
        tuple(rows),
        notes=tuple(lines),
    )
