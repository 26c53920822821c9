"""Disaggregated vs colocated serving on the interference mix (`workloads/interference.yaml`).

What it shows: long prompts injected beside decode-heavy streams stall those streams when the
same worker prefills them (colocated), and do not when a prefill worker does (disaggregated).

Setup, per layout, on the bench model:
- disaggregated: the decode worker alone on core 0; the prefill worker on core 1 with the
  gateway and the load generator, which stand in for other machines.
- colocated: the decode worker alone on core 0 (it prefills locally, with no chunk cap, as
  `tandem up --prefill 0` runs it); the gateway and the load generator on core 1.
Two phases per layout, on the same decode requests (the mix's `long_decode` class, closed loop):
1. decode-only: the decode streams alone;
2. mixed: the same streams while the mix's `long_prefill` requests arrive at a constant rate.
The figure is ITL p99 of the decode streams in phase 2 over phase 1 (goal for the
disaggregated layout: <= 1.3). Only gaps of the decode class count; the long prompts' own
tokens are not in it.
"""

from __future__ import annotations

from pathlib import Path

from tandem.loadtest.arrivals import ArrivalPattern, ClosedLoop, OpenLoop
from tandem.loadtest.metrics import percentile
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.suite.cluster import BenchCluster, ClusterSpec, WorkerSpec
from tandem.loadtest.suite.context import BenchContext, drive, drive_streams
from tandem.loadtest.suite.figures import Direction, Figure, Section
from tandem.loadtest.workloads import load_workload

GOAL = 1.3
DECODE_CPU, SHARED_CPU = 0, 1
LONG_RATE_RPS = 1.5
DECODE_CONCURRENCY = 8


def _mix(num_decode: int, num_long: int) -> tuple[list[WorkloadRequest], list[WorkloadRequest]]:
    """The first `num_decode` long_decode and `num_long` long_prefill requests of the mix."""
    path = Path(__file__).resolve().parent.parent / "workloads" / "interference.yaml"
    requests = load_workload(path).generate(8 * (num_decode + num_long), seed=0)
    decode = [r for r in requests if r.class_name == "long_decode"][:num_decode]
    long = [r for r in requests if r.class_name == "long_prefill"][:num_long]
    if len(decode) < num_decode or len(long) < num_long:
        raise RuntimeError("the interference mix has too few requests of a class")
    return decode, long


def _itl_p99_ms(records: tuple[RequestRecord, ...]) -> float:
    return 1000 * percentile([gap for r in records for gap in r.itl_gaps_s], 99)


def _measure(
    ctx: BenchContext, layout: str, decode: list[WorkloadRequest], long: list[WorkloadRequest], warmup: WorkloadRequest
) -> tuple[float, float, float]:
    """(decode-only ITL p99 ms, mixed ITL p99 ms, mixed duration s) for one layout. `warmup`
    is a long prompt outside `long`, so no measured prompt is in a prefix cache already."""
    workers: tuple[WorkerSpec, ...] = (WorkerSpec("decode", DECODE_CPU),)
    if layout == "disaggregated":
        workers = (WorkerSpec("prefill", SHARED_CPU), *workers)
    spec = ClusterSpec(ctx.model_dir, workers, gateway_cpu=SHARED_CPU)
    with BenchCluster.start(spec) as cluster:
        drive(cluster.url, cluster.model, [*decode[:2], warmup], ClosedLoop(2))
        alone = drive(cluster.url, cluster.model, decode, ClosedLoop(DECODE_CONCURRENCY))
        mixed, _ = drive_streams(
            cluster.url,
            cluster.model,
            [(decode, ClosedLoop(DECODE_CONCURRENCY)), (long, OpenLoop(LONG_RATE_RPS, ArrivalPattern.CONSTANT))],
        )
    return _itl_p99_ms(alone.records), _itl_p99_ms(mixed.records), mixed.duration_s


def run(ctx: BenchContext) -> Section:
    num_decode = ctx.size(48, 8)
    decode, long = _mix(num_decode, ctx.size(18, 3) + 1)
    long, warmup = long[:-1], long[-1]
    rows = [("layout", "decode-only ITL p99 (ms)", "with long prompts ITL p99 (ms)", "ratio", "mixed phase (s)")]
    ratios = {}
    for layout in ("disaggregated", "colocated"):
        ctx.log(f"interference: {layout}")
        alone_ms, mixed_ms, duration_s = _measure(ctx, layout, decode, long, warmup)
        ratios[layout] = (alone_ms, mixed_ms)
        rows.append((layout, f"{alone_ms:.1f}", f"{mixed_ms:.1f}", f"{mixed_ms / alone_ms:.2f}", f"{duration_s:.1f}"))
    disagg, coloc = ratios["disaggregated"], ratios["colocated"]
    figures = (
        Figure(
            "disaggregated: decode ITL p99 with long prompts / decode-only",
            disagg[1] / disagg[0],
            goal=GOAL,
            direction=Direction.AT_MOST,
        ),
        Figure("colocated: decode ITL p99 with long prompts / decode-only", coloc[1] / coloc[0]),
        Figure("decode ITL p99 with long prompts: colocated / disaggregated", coloc[1] / disagg[1]),
    )
    lens = sorted(len(r.prompt_token_ids) for r in long)
    setup = (
        f"{len(decode)} decode-heavy requests (16-32 prompt tokens, 192-256 output tokens) at concurrency "
        f"{DECODE_CONCURRENCY}; {len(long)} long prompts ({lens[0]}-{lens[-1]} tokens, 4 output tokens) at "
        f"{LONG_RATE_RPS:g}/s, constant. Decode worker alone on core {DECODE_CPU}; prefill worker (disaggregated "
        f"only), gateway and load generator on core {SHARED_CPU}; one torch thread per worker."
    )
    return Section(
        "interference", "Disaggregated vs colocated: decode ITL under long prompts", setup, figures, tuple(rows)
    )
