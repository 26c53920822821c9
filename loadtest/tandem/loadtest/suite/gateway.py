"""Gateway SSE headroom and the scheduler's decision latency (`tandem bench gateway`).

Headroom: streaming tokens/s through the gateway over the same requests streamed straight
from the decode worker's gRPC API, at concurrency 32 (goal >= 0.85: the gateway costs at most
15% of what the worker can stream). Decision latency: `route` on 100 workers, for a 4096-token
and a 32768-token prompt, in memory (budget: p99 <= 200 us each, issue 20); hashing the prompt
is timed apart (budget for 4096 tokens: < 100 us, median and p99). The route figures are the
steady state, a prefix routed before (the prefix index has recorded its runs); `route_cold`,
right after an event on every block of the prefix (a first sight), is reported beside them.
"""

from __future__ import annotations

import statistics

from tandem.loadtest.bench.gateway import GOAL, measure_gateway
from tandem.loadtest.bench.scheduler import run_scheduler_bench
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Direction, Figure, Section

ROUTE_P99_BUDGET_US = 200.0
HASH_4K_BUDGET_US = 100.0
NUM_WORKERS = 100
PROMPT_TOKENS = (4096, 32768)


def run(ctx: BenchContext) -> Section:
    report = measure_gateway(
        ctx.model_dir, concurrency=ctx.size(32, 4), max_tokens=ctx.size(64, 8), rounds=ctx.size(7, 1)
    )
    lines: list[str] = []
    timings = {
        n: run_scheduler_bench(NUM_WORKERS, n, iterations=ctx.size(5000, 100), out=lines.append) for n in PROMPT_TOKENS
    }
    rows = [("path", "tokens/s (median)", "rounds")]
    for name, values in (
        ("direct to the decode worker (gRPC)", report.direct),
        ("through the gateway (HTTP SSE)", report.via_gateway),
    ):
        rows.append((name, f"{statistics.median(values):.0f}", ", ".join(f"{v:.0f}" for v in values)))
    for n, t in timings.items():
        rows.append(
            (
                f"{n}-token prompt: scheduler route p50 / p99 / max (us)",
                f"{t['route_p50_us']:.0f} / {t['route_p99_us']:.0f} / {t['route_max_us']:.0f}",
                "",
            )
        )
        rows.append(
            (
                f"{n}-token prompt: route_cold (prefix just changed) p50 / p99 / max (us)",
                f"{t['route_cold_p50_us']:.0f} / {t['route_cold_p99_us']:.0f} / {t['route_cold_max_us']:.0f}",
                "",
            )
        )
        rows.append(
            (f"{n}-token prompt: prefix match p50 / p99 (us)", f"{t['match_p50_us']:.0f} / {t['match_p99_us']:.0f}", "")
        )
        rows.append(
            (
                f"{n}-token prompt: hash_blocks p50 / p99 (us)",
                f"{t['hash_blocks_p50_us']:.0f} / {t['hash_blocks_p99_us']:.0f}",
                "",
            )
        )
    figures = (
        Figure("gateway / direct streaming tokens/s", report.ratio, goal=GOAL),
        *(
            Figure(
                f"scheduler route p99, {n}-token prompt",
                timings[n]["route_p99_us"],
                unit=" us",
                goal=ROUTE_P99_BUDGET_US,
                direction=Direction.AT_MOST,
            )
            for n in PROMPT_TOKENS
        ),
        *(
            Figure(f"scheduler route p50, {n}-token prompt", timings[n]["route_p50_us"], unit=" us")
            for n in PROMPT_TOKENS
        ),
        *(
            Figure(f"scheduler route_cold p99, {n}-token prompt", timings[n]["route_cold_p99_us"], unit=" us")
            for n in PROMPT_TOKENS
        ),
        *(
            Figure(
                f"hash_blocks {q}, 4096-token prompt",
                timings[4096][f"hash_blocks_{q}_us"],
                unit=" us",
                goal=HASH_4K_BUDGET_US,
                direction=Direction.AT_MOST,
            )
            for q in ("p50", "p99")
        ),
    )
    setup = (
        f"{report.concurrency} streams of {report.prompt_len}-token prompts, {report.max_tokens} tokens each, "
        "alternating rounds; decode worker alone on core 0 (one torch thread), gateway and clients on core 1. "
        f"Scheduler: {NUM_WORKERS} workers, {' and '.join(map(str, PROMPT_TOKENS))}-token prompts, prefix_aware "
        "policy, in memory; hashing timed apart."
    )
    return Section(
        "gateway",
        "Gateway SSE headroom and scheduler decision latency",
        setup,
        figures,
        tuple(rows),
        notes=tuple(lines),
    )
