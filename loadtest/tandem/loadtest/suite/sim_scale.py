"""Simulator speed at scale: simulated seconds per wall second on one core.

Setup: Llama 3 8B on H100s (the roofline cost model), 30 % of the GPUs prefill and 70 %
decode, one GPU per worker, prefix-aware routing (the vectorised router, router.py), KV blocks
from the GPU memory. A Poisson trace: prompts 200-2000 tokens, outputs 20-400 tokens, half of
the requests in one of 50 prefix groups of 512 tokens. The process is pinned to one core.

Full: 1,000 GPUs, 2,000 requests/s for 600 simulated seconds (1.2 million requests); the goal
is that it finishes within 600 wall seconds (simulated/wall >= 1). Quick: 100 GPUs, 200
requests/s, 30 s.
"""

from __future__ import annotations

import os
import random
import time

from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Direction, Figure, Section
from tandem.scheduler.config import SchedulerConfig
from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.costmodel import RooflineCostModel, model_shape
from tandem.sim.gpus import gpu
from tandem.sim.results import Slo
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import TraceRequest

WALL_GOAL_S = 600.0
NUM_GROUPS, PREFIX_TOKENS = 50, 512


def poisson_trace(rate_rps: float, duration_s: float, seed: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, out = 0.0, list[TraceRequest]()
    while True:
        t += rng.expovariate(rate_rps)
        if t >= duration_s:
            return out
        group = rng.randrange(NUM_GROUPS) if rng.random() < 0.5 else None
        prefix = PREFIX_TOKENS if group is not None else 0
        out.append(TraceRequest(t, rng.randint(200, 2000), rng.randint(20, 400), group, prefix))


def run(ctx: BenchContext) -> Section:
    num_gpus = ctx.size(1000, 100)
    rate_rps = ctx.size(2000, 200)
    duration_s = float(ctx.size(600, 30))
    cost = RooflineCostModel(model_shape("llama-3-8b"), gpu("H100"))
    num_prefill = num_gpus * 3 // 10
    config = ClusterConfig(
        num_prefill,
        num_gpus - num_prefill,
        StepModelConfig(num_blocks=cost.kv_capacity_tokens() // 16),
        SchedulerConfig(),
        slo=Slo(ttft_s=1.0, itl_s=0.05),
        vectorised_routing=True,
    )
    trace = poisson_trace(rate_rps, duration_s, seed=0)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core (run.py restores it)
    ctx.log(f"sim_scale: {num_gpus} GPUs, {len(trace)} requests")
    wall_s = time.perf_counter()
    result = ClusterSim(config, cost, trace).run()
    wall_s = time.perf_counter() - wall_s
    speed = result.makespan_s / wall_s
    rows = (
        ("GPUs (prefill + decode)", "requests", "simulated (s)", "wall (s)", "simulated s / wall s", "loop events"),
        (
            f"{num_gpus} ({num_prefill} + {num_gpus - num_prefill})",
            str(result.num_completed),
            f"{result.makespan_s:.1f}",
            f"{wall_s:.1f}",
            f"{speed:.2f}",
            str(result.num_events),
        ),
    )
    goal = duration_s / WALL_GOAL_S
    figures = (
        Figure("simulated seconds per wall second", speed, goal=None if ctx.quick else goal),
        Figure("wall seconds", wall_s, unit=" s", goal=None if ctx.quick else WALL_GOAL_S, direction=Direction.AT_MOST),
        Figure("TTFT p50 (simulated, ms)", 1000 * (result.ttft.p50_s or 0.0), unit=" ms"),
        Figure("ITL p50 (simulated, ms)", 1000 * (result.itl.p50_s or 0.0), unit=" ms"),
    )
    setup = (
        f"Llama 3 8B on {num_gpus} H100s ({num_prefill} prefill, {num_gpus - num_prefill} decode), "
        f"{rate_rps} requests/s Poisson for {duration_s:g} s; prompts 200-2000, outputs 20-400 tokens, half in "
        f"{NUM_GROUPS} prefix groups of {PREFIX_TOKENS} tokens; one core."
    )
    return Section("sim_scale", "Simulator speed at 1,000 GPUs", setup, figures, rows)
