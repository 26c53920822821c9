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
   cluster, half just before the validated run and half just after, and `Serving.apply` fits
   the model to them:
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
3. Simulation: the same requests (`sim_workloads.workload_trace`, same seed) at the times the
   load generator really sent them (`sent_trace`), on a simulated cluster with the worker's
   batcher limits and KV pool.
The figures are |simulated - real| / real per metric; goal <= 0.15 each. ITL is compared as the
p50 of the requests' mean gaps on both sides (the load generator's TPOT), the simulator's ITL. The real run's
figures include what the simulator does not model (HTTP, tokenisation, gRPC, SSE), which is
part of the error.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tandem.engine.config import MiB
from tandem.loadtest.arrivals import ClosedLoop, OpenLoop
from tandem.loadtest.metrics import summarize
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.runner import RunResult
from tandem.loadtest.sim_calibration import CalibrationGrid, calibrate
from tandem.loadtest.sim_workloads import workload_trace
from tandem.loadtest.suite.cluster import BenchCluster, ClusterSpec, WorkerSpec
from tandem.loadtest.suite.context import BenchContext, drive
from tandem.loadtest.suite.figures import Direction, Figure, Section
from tandem.loadtest.workloads import load_workload
from tandem.scheduler.config import SchedulerConfig
from tandem.sim.calibrate import CalibratedCostModel, Coefficients, relative_least_squares
from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.results import SimResult
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import TraceRequest

GOAL = 0.15
WORKER_CPU, SHARED_CPU = 0, 1
RATE_RPS = 4.0
SEED = 0
KV_CACHE_MIB = 256
PROBE_PROMPT, PROBE_OUTPUT = 64, 48
PROBE_BATCHES = (1, 2, 4)
# prompt lengths across the workload's (random.yaml: 64-256); a prefill probe stops at 2 tokens
PREFILL_PROBE_PROMPTS, PREFILL_PROBE_OUTPUT = (64, 128, 192, 256), 2
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


def _probes(num: int, prompt: int, output: int, name: str) -> list[WorkloadRequest]:
    rng = random.Random(f"{name}-{prompt}")
    return [
        WorkloadRequest(f"{name}-{i}", tuple(rng.randrange(4, 500) for _ in range(prompt)), output) for i in range(num)
    ]


def decode_step_s(records: Sequence[RequestRecord]) -> list[float]:
    """Each request's mean gap between output tokens over the gaps that no other request's
    prefill can have fallen into (a gap that overlaps another request's wait for its first
    token); requests left with no gap are skipped."""
    waits = [(r.request_id, r.start_s, r.first_token_s) for r in records if r.first_token_s is not None]
    steps = []
    for record in records:
        times = record.token_times_s
        clean = [
            later - earlier
            for earlier, later in itertools.pairwise(times)
            if not any(rid != record.request_id and start < later and earlier < first for rid, start, first in waits)
        ]
        if clean:
            steps.append(statistics.fmean(clean))
    return steps


@dataclasses.dataclass(frozen=True)
class Serving:
    """What the probes measured on the real cluster, in seconds: the served decode step at each
    batch size (the median of its probes' `decode_step_s`) and the median TTFT alone at each
    of several prompt lengths."""

    decode_step_s: Mapping[int, float]
    ttft_alone_s: Mapping[int, float]

    def apply(self, cost: CalibratedCostModel) -> tuple[CalibratedCostModel, float]:
        """`cost` as the served worker ran while the probes did, and the gateway latency:

        1. TTFT alone = a + scale x (the engine's token and attention terms of the prefill),
           fitted by relative least squares over the probed prompt lengths: the engine's token
           and attention terms are multiplied by `scale` (what the served worker's prefills cost
           over what the engine's did, at the probes' time);
        2. the fixed and per-decoded-sequence terms fitted (relative least squares) so that a
           decode step of each probed batch size takes what the served worker took;
        3. the gateway latency: a less the fixed term."""
        c = cost.coefficients
        lengths = sorted(self.ttft_alone_s)
        engine_prefill = [c.token_s * n + c.prefill_context_s * (n * (n + 1) // 2) for n in lengths]
        ttfts = np.array([self.ttft_alone_s[n] for n in lengths])
        intercept, scale = (
            relative_least_squares(np.array([[1.0, e] for e in engine_prefill]), ttfts)
            if len(lengths) >= 2
            else (0.0, 0.0)
        )
        if not scale > 0:
            raise ValueError(f"the probes' TTFTs {self.ttft_alone_s} give no prefill cost to scale {c} by")
        token_s, prefill_context_s, decode_context_s = (
            float(scale) * x for x in (c.token_s, c.prefill_context_s, c.decode_context_s)
        )
        context = PROBE_PROMPT + PROBE_OUTPUT // 2
        batches = sorted(self.decode_step_s)
        # what the served step adds to the scaled token and attention terms
        served = [self.decode_step_s[b] - b * (token_s + decode_context_s * context) for b in batches]
        if len(batches) < 2 or min(served) <= 0:
            raise ValueError(
                f"the probes' decode steps {self.decode_step_s} leave nothing to fit against {c} x {scale:.3g}"
            )
        fixed, per_seq = relative_least_squares(np.array([[1.0, b] for b in batches]), np.array(served))
        fitted = Coefficients(float(fixed), token_s, float(per_seq), prefill_context_s, decode_context_s)
        model = dataclasses.replace(cost, coefficients=fitted)
        return model, max(0.0, float(intercept) - fitted.step_s)


def _probe(
    url: str, model: str, waves: int, name: str
) -> tuple[dict[int, list[RequestRecord]], dict[int, list[float]]]:
    """Closed-loop decode probes at each of PROBE_BATCHES (`waves` requests per slot), then
    prefill probes alone, each of PREFILL_PROBE_PROMPTS in turn (`waves` x 2 each): their
    records by batch size and their TTFTs by prompt length."""
    decodes = {}
    for batch in PROBE_BATCHES:
        probes = _probes(batch * waves, PROBE_PROMPT, PROBE_OUTPUT, f"{name}-b{batch}")
        decodes[batch] = list(drive(url, model, probes, ClosedLoop(batch)).records)
    prefills = [_probes(2 * waves, n, PREFILL_PROBE_OUTPUT, f"{name}-p{n}") for n in PREFILL_PROBE_PROMPTS]
    records = drive(url, model, [r for turn in zip(*prefills) for r in turn], ClosedLoop(1)).records
    ttfts: dict[int, list[float]] = {n: [] for n in PREFILL_PROBE_PROMPTS}
    for record in records:
        ttfts[record.prompt_tokens].append(record.ttft_s or 0.0)
    return decodes, ttfts


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


def drift_note(
    before: tuple[Mapping[int, Sequence[RequestRecord]], Mapping[int, Sequence[float]]],
    after: tuple[Mapping[int, Sequence[RequestRecord]], Mapping[int, Sequence[float]]],
) -> str:
    """How far the served worker's speed moved between the probes before and after the run (the
    model is fitted to their median, so the run is predicted at that speed). Other processes on
    the machine move it: in six runs on the loaded machine the run's prefill steps were 15%
    slower to 15% faster than in the probe windows, and the TTFT and ITL errors took that sign."""
    batch, prompt = min(PROBE_BATCHES), max(PREFILL_PROBE_PROMPTS)
    steps = [statistics.median(decode_step_s(side[0][batch])) * 1e3 for side in (before, after)]
    ttfts = [statistics.median(side[1][prompt]) * 1e3 for side in (before, after)]
    return (
        f"Probe windows, before / after the run: served decode step at batch {batch} {steps[0]:.2f} / "
        f"{steps[1]:.2f} ms; TTFT alone at {prompt} prompt tokens {ttfts[0]:.2f} / {ttfts[1]:.2f} ms."
    )


def _simulate(
    cost: CalibratedCostModel, gateway_s: float, ctx: BenchContext, requests: Sequence[WorkloadRequest], real: RunResult
) -> SimResult:
    workload = load_workload(WORKLOAD)
    trace = sent_trace(workload_trace(workload, len(requests), SEED, OpenLoop(RATE_RPS)), requests, real.records)
    engine = ClusterSpec(ctx.model_dir, (WorkerSpec("decode", WORKER_CPU),), SHARED_CPU).config().worker.engine
    num_blocks = KV_CACHE_MIB * MiB // (cost.kv_bytes_per_token() * engine.block_size)
    step = StepModelConfig(
        engine.block_size,
        engine.max_num_batched_tokens,
        engine.max_num_seqs,
        engine.max_prefill_chunk_tokens,
        num_blocks,
    )
    config = ClusterConfig(0, 1, step, SchedulerConfig(block_size=engine.block_size), gateway_latency_s=gateway_s)
    return ClusterSim(config, cost, trace).run()


def run(ctx: BenchContext) -> Section:
    num_requests = ctx.size(80, 12)
    workload = load_workload(WORKLOAD)
    requests = workload.generate(num_requests, SEED)
    spec = ClusterSpec(ctx.model_dir, (WorkerSpec("decode", WORKER_CPU),), SHARED_CPU, kv_cache_mib=KV_CACHE_MIB)
    ctx.log("sim_validate: real cluster")
    waves = ctx.size(4, 1)
    with BenchCluster.start(spec) as cluster:
        drive(cluster.url, cluster.model, workload.generate(4, SEED + 1), OpenLoop(RATE_RPS))  # warm-up
        before = _probe(cluster.url, cluster.model, waves, "before")
        real_run = drive(cluster.url, cluster.model, requests, OpenLoop(RATE_RPS), seed=SEED)
        after = _probe(cluster.url, cluster.model, waves, "after")
    real = summarize(real_run.records, real_run.duration_s)
    serving = Serving(
        {b: statistics.median(decode_step_s(before[0][b]) + decode_step_s(after[0][b])) for b in PROBE_BATCHES},
        {n: statistics.median(before[1][n] + after[1][n]) for n in PREFILL_PROBE_PROMPTS},
    )
    probed = ", ".join(f"{b}: {s * 1e3:.2f}" for b, s in serving.decode_step_s.items())
    ttfts = ", ".join(f"{n}: {s * 1e3:.2f}" for n, s in serving.ttft_alone_s.items())
    ctx.log(f"sim_validate: served decode step (ms) by batch size {probed}; TTFT alone (ms) by prompt {ttfts}")
    ctx.log("sim_validate: calibration")
    engine_cost = _calibrate(ctx)
    cost, gateway_s = serving.apply(engine_cost)
    ctx.log(
        f"sim_validate: engine fit {engine_cost.coefficients}; served {cost.coefficients}; gateway {gateway_s:.5f} s"
    )
    sim = _simulate(cost, gateway_s, ctx, requests, real_run)
    sim_throughput = sim.output_tokens_per_s * sim.duration_s / sim.makespan_s if sim.makespan_s else 0.0
    pairs = {
        "TTFT p50 (ms)": ((real.ttft.p50_ms or 0.0), 1000 * (sim.ttft.p50_s or 0.0)),
        "ITL p50 (ms)": ((real.tpot.p50_ms or 0.0), 1000 * (sim.itl.p50_s or 0.0)),
        "throughput (output tokens/s)": (real.output_throughput_tps, sim_throughput),
    }
    rows = [("metric", "real cluster", "simulated", "error")]
    figures = []
    for name, (measured, simulated) in pairs.items():
        error = abs(simulated - measured) / measured if measured else float("inf")
        rows.append((name, f"{measured:.2f}", f"{simulated:.2f}", f"{error:.1%}"))
        figures.append(Figure(f"{name}: |simulated - real| / real", error, goal=GOAL, direction=Direction.AT_MOST))
    e, c = engine_cost.coefficients, cost.coefficients
    setup = (
        f"{num_requests} requests of the random workload at {RATE_RPS:g}/s (Poisson, seed {SEED}); one decode "
        f"worker on core {WORKER_CPU} (local prefill, {KV_CACHE_MIB} MiB KV), gateway and load generator on core "
        f"{SHARED_CPU}. CPU cost model fitted on the real engine's step times: step {e.step_s * 1e3:.2f} ms + "
        f"{e.token_s * 1e6:.1f} us/token + {e.decode_seq_s * 1e6:.1f} us/decoded sequence + attention terms "
        f"(fit's worst error {engine_cost.max_relative_error:.0%}); from the served probes: step "
        f"{c.step_s * 1e3:.2f} ms, {c.decode_seq_s * 1e6:.1f} us/decoded sequence (served decode step by batch "
        f"size, ms: {probed}; TTFT alone by prompt tokens, ms: {ttfts}; token and attention terms scaled by "
        f"{c.token_s / e.token_s if e.token_s else 1.0:.2f}); gateway latency "
        f"{gateway_s * 1e3:.2f} ms."
    )
    notes = (
        "ITL: on both sides the p50 of the requests' mean gap between output tokens (the load generator's TPOT; "
        "the simulator keeps no single gaps, results.py). The real run's p50 over every gap was "
        f"{real.itl.p50_ms or 0.0:.2f} ms.",
        drift_note(before, after),
    )
    return Section("sim_validate", "Simulator vs the real cluster", setup, tuple(figures), tuple(rows), notes)
