"""The simulator against the real cluster on this machine: TTFT p50, ITL p50 and throughput.

1. Real run: a bench cluster (one decode worker alone on core 0, one torch thread, local
   prefill; the gateway, Redis and the load generator on core 1), the `random` workload
   (64-256 prompt tokens, 16-64 output tokens) sent open-loop (Poisson) by the load generator.
2. Calibration: `tandem.loadtest.sim_calibration.calibrate` times the real engine's steps on
   the bench model, pinned to core 0 with one torch thread like the worker, and fits the CPU
   cost model (`tandem.sim.calibrate`). The served worker does more per step than
   `Engine.step` (its gRPC stream shares the core), and the gateway spends time on a request
   before routing it; both are measured on the real cluster with probe requests that are not
   the validated ones (64-token prompts, 48 output tokens, alone and 8 at a time): the median
   gaps at the two batch sizes set the fixed and per-decoded-sequence terms (the token and
   attention terms stay as fitted on the engine), and the median TTFT alone minus the
   prefill step gives the gateway latency.
3. Simulation: the same requests at the same send times (`sim_workloads.workload_trace`, same
   seed) on a simulated cluster with the worker's batcher limits and KV pool.
The figures are |simulated - real| / real per metric; goal <= 0.15 each. ITL is compared as the
p50 of the requests' mean gaps on both sides (the load generator's TPOT), the simulator's ITL. The real run's
figures include what the simulator does not model (HTTP, tokenisation, gRPC, SSE), which is
part of the error.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
from pathlib import Path

from tandem.engine.config import MiB
from tandem.loadtest.arrivals import ClosedLoop, OpenLoop
from tandem.loadtest.metrics import summarize
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.sim_calibration import CalibrationGrid, calibrate
from tandem.loadtest.sim_workloads import workload_trace
from tandem.loadtest.suite.cluster import BenchCluster, ClusterSpec, WorkerSpec
from tandem.loadtest.suite.context import BenchContext, drive
from tandem.loadtest.suite.figures import Direction, Figure, Section
from tandem.loadtest.workloads import load_workload
from tandem.scheduler.config import SchedulerConfig
from tandem.sim.calibrate import CalibratedCostModel
from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.results import SimResult
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import StepShape

GOAL = 0.15
WORKER_CPU, SHARED_CPU = 0, 1
RATE_RPS = 4.0
SEED = 0
KV_CACHE_MIB = 256
PROBE_PROMPT, PROBE_OUTPUT, PROBE_BATCH = 64, 48, 8
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
            repeats=ctx.size(3, 1),
        )
        return calibrate(ctx.model_dir, grid, engine_options={"num_threads": 1}, log=ctx.log)
    finally:
        os.sched_setaffinity(0, own)


def _probes(num: int) -> list[WorkloadRequest]:
    rng = random.Random(99)
    return [
        WorkloadRequest(f"probe-{i}", tuple(rng.randrange(4, 500) for _ in range(PROBE_PROMPT)), PROBE_OUTPUT)
        for i in range(num)
    ]


def _median_gap_s(records: tuple[RequestRecord, ...]) -> float:
    return statistics.median(gap for r in records for gap in r.itl_gaps_s)


@dataclasses.dataclass(frozen=True)
class Serving:
    """What the probes measured on the real cluster: median gaps alone and at PROBE_BATCH, and
    the median TTFT alone (seconds)."""

    gap_alone_s: float
    gap_batch_s: float
    ttft_alone_s: float

    def apply(self, cost: CalibratedCostModel) -> tuple[CalibratedCostModel, float]:
        """`cost` with its fixed and per-decoded-sequence terms set so that a decode step of 1
        and of PROBE_BATCH sequences takes what the served worker took (its other terms, from
        the engine's steps, kept), and the gateway latency: TTFT alone less the prefill step."""
        c = cost.coefficients
        context = PROBE_PROMPT + PROBE_OUTPUT // 2

        def rest_s(batch: int) -> float:  # the decode step's terms that stay as fitted
            return c.token_s * batch + c.decode_context_s * batch * context

        one = self.gap_alone_s - rest_s(1)
        per_seq = max(0.0, (self.gap_batch_s - rest_s(PROBE_BATCH) - one) / (PROBE_BATCH - 1))
        fixed = max(0.0, one - per_seq)
        served = dataclasses.replace(cost, coefficients=dataclasses.replace(c, step_s=fixed, decode_seq_s=per_seq))
        prefill = StepShape(prefill_tokens=PROBE_PROMPT, prefill_context_tokens=PROBE_PROMPT * (PROBE_PROMPT + 1) // 2)
        return served, max(0.0, self.ttft_alone_s - served.step_seconds(prefill))


def _simulate(cost: CalibratedCostModel, gateway_s: float, ctx: BenchContext, num_requests: int) -> SimResult:
    workload = load_workload(WORKLOAD)
    trace = workload_trace(workload, num_requests, SEED, OpenLoop(RATE_RPS))
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
    with BenchCluster.start(spec) as cluster:
        drive(cluster.url, cluster.model, workload.generate(4, SEED + 1), OpenLoop(RATE_RPS))  # warm-up
        probes = _probes(ctx.size(4, 2) + ctx.size(24, 8))
        alone = drive(cluster.url, cluster.model, probes[: ctx.size(4, 2)], ClosedLoop(1))
        batch = drive(cluster.url, cluster.model, probes[ctx.size(4, 2) :], ClosedLoop(PROBE_BATCH))
        real_run = drive(cluster.url, cluster.model, requests, OpenLoop(RATE_RPS), seed=SEED)
    real = summarize(real_run.records, real_run.duration_s)
    serving = Serving(
        _median_gap_s(alone.records),
        _median_gap_s(batch.records),
        statistics.median(r.ttft_s or 0.0 for r in alone.records),
    )
    ctx.log("sim_validate: calibration")
    engine_cost = _calibrate(ctx)
    cost, gateway_s = serving.apply(engine_cost)
    sim = _simulate(cost, gateway_s, ctx, num_requests)
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
        f"{c.step_s * 1e3:.2f} ms, {c.decode_seq_s * 1e6:.1f} us/decoded sequence; gateway latency "
        f"{gateway_s * 1e3:.2f} ms."
    )
    notes = (
        "ITL: on both sides the p50 of the requests' mean gap between output tokens (the load generator's TPOT; "
        "the simulator keeps no single gaps, results.py). The real run's p50 over every gap was "
        f"{real.itl.p50_ms or 0.0:.2f} ms.",
    )
    return Section("sim_validate", "Simulator vs the real cluster", setup, tuple(figures), tuple(rows), notes)
