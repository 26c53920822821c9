"""The simulator against the real cluster on this machine: TTFT p50, ITL p50 and throughput.

1. Real run: a bench cluster (one decode worker alone on core 0, one torch thread, local
   prefill; the gateway, Redis and the load generator on core 1), the `random` workload
   (64-256 prompt tokens, 16-64 output tokens) sent open-loop (Poisson) by the load generator.
2. Calibration: `tandem.loadtest.sim_calibration.calibrate` times the real engine's steps on
   the bench model, pinned to core 0 with one torch thread like the worker, and fits the CPU
   cost model (`tandem.sim.calibrate`). The served worker is not the engine alone: it does
   more per step (its gRPC streams share the core, more so the more sequences it streams),
   the gateway spends time on a request before routing it, and the rest of the machine loads
   it differently from minute to minute (the engine's timings are taken at another moment).
   So probe requests that are not the validated ones measure the served worker on the real
   cluster (`sim_probes`), and `Serving.apply` fits the model to them. The validated run is
   sent in SEGMENTS consecutive parts with a round of the same probes before, between and
   after them, and each segment is simulated with the model fitted on the two rounds on either
   side of it: the machine's speed drifts (other processes load it), and with one probe window
   before and one after the whole 20-second run, the run's own steps were 15% slower to 15%
   faster than the windows' in six loaded runs, which flipped the errors' sign from run to
   run. A round is 2 waves of every probe, so the 4 rounds send the 8 waves that the two
   windows of 4 did: the same probes, the same count. Segment k is sent open-loop at the same
   rate with Poisson seed SEED + k. The probes never time the validated requests' own steps.
   The probes:
   - prefill probes alone at prompt lengths across the workload's (PREFILL_PROBE_PROMPTS):
     their TTFTs scale the engine's token and attention terms, and what is left is the fixed
     step plus the gateway latency;
   - decode probes (64-token prompts, 48 output tokens) in closed loop at each of
     PROBE_BATCHES: a probe's decode step is the mean of its gaps that no other probe's
     prefill fell into (the mean, as the validated ITL is a mean per request: a load burst's
     slow gaps count, as they do there); the median over the probes of a batch size gives the
     served decode step at that size; a relative least-squares line through them sets the
     fixed and per-decoded-sequence terms.
   PROBE_BATCHES are the batch sizes the validated run decodes at: at 4 requests/s of 16-64
   tokens, steps of 1 to 4 sequences carry about 95% of its decode time. The marginal cost of
   a sequence falls with the batch (about 1 ms from 1 to 2 sequences, 0.4 ms per sequence
   from 4 to 8), so a line through 1 and 8 sequences made the steps of 2 and 3 up to 15% too
   fast.
3. Simulation: each segment's requests (`sim_workloads.workload_trace`, same seed) at the times
   the load generator really sent them (`sent_trace`), on a simulated cluster with the worker's
   batcher limits and KV pool; the segments' requests are pooled for the percentiles, and the
   throughput is their output tokens over the sum of the segments' makespans on either side.
The figures are |simulated - real| / real per metric; goal <= 0.15 each. ITL is compared as the
p50 of the requests' mean gaps on both sides (the load generator's TPOT), the simulator's ITL. The real run's
figures include what the simulator does not model (HTTP, tokenisation, gRPC, SSE), which is
part of the error.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path

from tandem.engine.config import MiB
from tandem.loadtest.arrivals import OpenLoop
from tandem.loadtest.metrics import summarize
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.runner import RunResult
from tandem.loadtest.sim_calibration import CalibrationGrid, calibrate
from tandem.loadtest.sim_workloads import workload_trace
from tandem.loadtest.suite.cluster import BenchCluster, ClusterSpec, WorkerSpec
from tandem.loadtest.suite.context import BenchContext, drive
from tandem.loadtest.suite.figures import Direction, Figure, Section
from tandem.loadtest.suite.sim_probes import Serving, drift_note, probe_round
from tandem.loadtest.workloads import load_workload
from tandem.scheduler.config import SchedulerConfig
from tandem.sim.calibrate import CalibratedCostModel
from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.results import SimResult, percentile
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import TraceRequest

GOAL = 0.15
WORKER_CPU, SHARED_CPU = 0, 1
RATE_RPS = 4.0
SEED = 0
KV_CACHE_MIB = 256
# the validated run is sent in SEGMENTS parts, with a probe round before, between and after them
SEGMENTS = 3
WORKLOAD = Path(__file__).resolve().parent.parent / "workloads" / "random.yaml"


def _calibrate(ctx: BenchContext) -> CalibratedCostModel:
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {WORKER_CPU})
    try:
        grid = CalibrationGrid(
            prefill_tokens=(16, 64, 128, 256),
            prefill_chunk_tokens=64,
            decode_batch_sizes=(1, 4, 16),
            decode_context_tokens=(64, 256),
            repeats=ctx.size(5, 1),  # rounds over the grid: the fastest of 5 is rarely slowed by a neighbour
        )
        return calibrate(ctx.model_dir, grid, engine_options={"num_threads": 1}, log=ctx.log)
    finally:
        os.sched_setaffinity(0, own)


def sent_trace(
    trace: Sequence[TraceRequest], requests: Sequence[WorkloadRequest], records: Sequence[RequestRecord]
) -> tuple[TraceRequest, ...]:
    """`trace` (the i-th entry is `requests[i]`) arriving when the load generator really sent
    each request (its record's `start_s`, on the run's clock, like the trace's times), in the
    order they were sent. The schedule is not what was sent: the first request goes out late,
    once the client is up (23-54 ms in six runs here), bunched with the next ones; while other
    processes load the machine, the load generator's core stalls and sends some late (up to
    126 ms in those runs)."""
    sent = {r.request_id: r.start_s for r in records}
    missing = [r.request_id for r in requests if r.request_id not in sent]
    if len(trace) != len(requests) or missing:
        raise ValueError(f"the real run has no record of {missing[:3]} ({len(trace)} traced, {len(requests)} sent)")
    timed = [dataclasses.replace(t, arrival_s=sent[r.request_id]) for t, r in zip(trace, requests)]
    return tuple(sorted(timed, key=lambda t: t.arrival_s))


@dataclasses.dataclass(frozen=True)
class Segment:
    """One segment of the validated run: what the real cluster did, and the cost model and
    gateway latency fitted on the probe rounds on either side of it."""

    requests: Sequence[WorkloadRequest]
    trace: Sequence[TraceRequest]  # the i-th entry is requests[i]
    real: RunResult
    cost: CalibratedCostModel
    gateway_s: float


def _simulate(ctx: BenchContext, segment: Segment) -> tuple[SimResult, list[float], list[float]]:
    """The segment on a simulated cluster: its result, and its requests' TTFTs and mean gaps."""
    trace = sent_trace(segment.trace, segment.requests, segment.real.records)
    engine = ClusterSpec(ctx.model_dir, (WorkerSpec("decode", WORKER_CPU),), SHARED_CPU).config().worker.engine
    num_blocks = KV_CACHE_MIB * MiB // (segment.cost.kv_bytes_per_token() * engine.block_size)
    step = StepModelConfig(
        engine.block_size,
        engine.max_num_batched_tokens,
        engine.max_num_seqs,
        engine.max_prefill_chunk_tokens,
        num_blocks,
    )
    scheduler = SchedulerConfig(block_size=engine.block_size)
    config = ClusterConfig(0, 1, step, scheduler, gateway_latency_s=segment.gateway_s)
    sim = ClusterSim(config, segment.cost, trace)
    result = sim.run()
    ttfts, itls, _ = sim.records.summary_times()
    return result, ttfts, itls


def segments_of(requests: Sequence[WorkloadRequest], count: int) -> list[Sequence[WorkloadRequest]]:
    """`requests` in `count` consecutive slices of sizes differing by at most one."""
    if not 1 <= count <= len(requests):
        raise ValueError(f"cannot split {len(requests)} requests into {count} segments")
    bounds = [len(requests) * k // count for k in range(count + 1)]
    return [requests[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def run(ctx: BenchContext) -> Section:
    num_requests = ctx.size(80, 12)
    workload = load_workload(WORKLOAD)
    requests = workload.generate(num_requests, SEED)
    trace = workload_trace(workload, num_requests, SEED, OpenLoop(RATE_RPS))
    parts = segments_of(requests, SEGMENTS)
    spec = ClusterSpec(ctx.model_dir, (WorkerSpec("decode", WORKER_CPU),), SHARED_CPU, kv_cache_mib=KV_CACHE_MIB)
    ctx.log(f"sim_validate: real cluster ({SEGMENTS} segments, probe rounds before, between and after them)")
    waves = ctx.size(2, 1)
    started = time.perf_counter()
    with BenchCluster.start(spec) as cluster:
        drive(cluster.url, cluster.model, workload.generate(4, SEED + 1), OpenLoop(RATE_RPS))  # warm-up
        rounds = [probe_round(cluster.url, cluster.model, waves, "round0")]
        runs = []
        for k, part in enumerate(parts, 1):
            runs.append(drive(cluster.url, cluster.model, part, OpenLoop(RATE_RPS), seed=SEED + k))
            rounds.append(probe_round(cluster.url, cluster.model, waves, f"round{k}"))
    real_s = time.perf_counter() - started
    ctx.log("sim_validate: calibration")
    engine_cost = _calibrate(ctx)
    segments, fits = [], []
    offset = 0
    for k, (part, real_run) in enumerate(zip(parts, runs)):
        serving = Serving.of(rounds[k : k + 2])
        cost, gateway_s = serving.apply(engine_cost)
        segments.append(Segment(part, trace[offset : offset + len(part)], real_run, cost, gateway_s))
        offset += len(part)
        c = cost.coefficients
        fits.append(
            f"step {c.step_s * 1e3:.2f} ms, {c.decode_seq_s * 1e6:.1f} us/decoded sequence, token and attention terms "
            f"x {c.token_s / engine_cost.coefficients.token_s if engine_cost.coefficients.token_s else 1.0:.2f}, "
            f"gateway {gateway_s * 1e3:.2f} ms"
        )
        ctx.log(f"sim_validate: segment {k + 1}: {fits[-1]}")
    real = summarize([r for s in segments for r in s.real.records], sum(s.real.duration_s for s in segments))
    sims = [_simulate(ctx, s) for s in segments]
    sim_ttft = percentile([t for _, ttfts, _ in sims for t in ttfts], 50)
    sim_itl = percentile([t for _, _, itls in sims for t in itls], 50)
    sim_tokens = sum(r.output_tokens_per_s * r.duration_s for r, _, _ in sims)
    sim_throughput = sim_tokens / sum(r.makespan_s for r, _, _ in sims)
    pairs = {
        "TTFT p50 (ms)": ((real.ttft.p50_ms or 0.0), 1000 * sim_ttft),
        "ITL p50 (ms)": ((real.tpot.p50_ms or 0.0), 1000 * sim_itl),
        "throughput (output tokens/s)": (real.output_throughput_tps, sim_throughput),
    }
    rows = [("metric", "real cluster", "simulated", "error")]
    figures = []
    for name, (measured, simulated) in pairs.items():
        error = abs(simulated - measured) / measured if measured else float("inf")
        rows.append((name, f"{measured:.2f}", f"{simulated:.2f}", f"{error:.1%}"))
        figures.append(Figure(f"{name}: |simulated - real| / real", error, goal=GOAL, direction=Direction.AT_MOST))
    e = engine_cost.coefficients
    segment_fits = "; ".join(f"segment {k}: {fit}" for k, fit in enumerate(fits, 1))
    setup = (
        f"{num_requests} requests of the random workload at {RATE_RPS:g}/s (Poisson, seed {SEED}) in {SEGMENTS} "
        f"segments, with a round of probes before, between and after them ({real_s:.0f} s on the real cluster); "
        f"one decode worker on core {WORKER_CPU} (local prefill, {KV_CACHE_MIB} MiB KV), gateway and load generator "
        f"on core {SHARED_CPU}. CPU cost model fitted on the real engine's step times: step {e.step_s * 1e3:.2f} ms "
        f"+ {e.token_s * 1e6:.1f} us/token + {e.decode_seq_s * 1e6:.1f} us/decoded sequence + attention terms "
        f"(fit's worst error {engine_cost.max_relative_error:.0%}); each segment's from the probe rounds on either "
        f"side of it: {segment_fits}."
    )
    notes = (
        "ITL: on both sides the p50 of the requests' mean gap between output tokens (the load generator's TPOT; "
        "the simulator keeps no single gaps, results.py). The real run's p50 over every gap was "
        f"{real.itl.p50_ms or 0.0:.2f} ms.",
        drift_note(rounds),
    )
    return Section("sim_validate", "Simulator vs the real cluster", setup, tuple(figures), tuple(rows), notes)
