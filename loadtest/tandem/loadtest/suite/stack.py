"""The full stack through the gateway against the in-process engine, on the same core.

The stack: one decode worker alone on core 0 (one torch thread, local prefill), the gateway
and the clients on core 1 — every request crosses HTTP, the gateway's completion path, the
scheduler, gRPC and SSE. The clients are the lean asyncio SSE readers of `tandem bench
gateway` rather than the load generator: at these rates the load generator's own parsing
would be what is measured, and real clients run on other machines. The baseline:
`Engine.generate` in this process, pinned to core 0 with one torch thread. Both run the same
prompts at the same concurrency, in
alternating rounds, and count output tokens per wall second. Goal: stack / engine >= 0.90.

The disaggregated stack (a prefill worker on core 1 too, every prompt handed off over gRPC)
runs against the same baseline, in rounds alternating with its own (so that both ratios
compare rounds run side by side), goal >= 0.75; it has a second core for prefill. Two more
figures, without goal, say where the difference goes: the decode worker's own gRPC Decode
streams read straight from core 1 (no gateway, no HTTP) against the engine, and the stack
against those streams. The cost rows price each worker as one GPU (`--gpu-hour-cost`).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import torch

from tandem.common.request import SamplingParams
from tandem.engine.engine import Engine
from tandem.loadtest.bench.gateway import THROUGHPUT_ADMISSION, stream_direct, stream_via_gateway
from tandem.loadtest.cost import dollars_per_million
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.suite.cluster import BenchCluster, ClusterSpec, WorkerSpec
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Figure, Section

GOAL = 0.90  # issue 20: colocated stack / engine
DISAGG_GOAL = 0.75  # issue 20: disaggregated stack / engine
WORKER_CPU, CLIENT_CPU = 0, 1
PROMPT_LEN = 64


def _requests(round_index: int, n: int, max_tokens: int) -> list[WorkloadRequest]:
    g = torch.Generator().manual_seed(1000 + round_index)
    return [
        WorkloadRequest(
            f"r{round_index}-{i}", tuple(torch.randint(4, 500, (PROMPT_LEN,), generator=g).tolist()), max_tokens
        )
        for i in range(n)
    ]


def _engine_tps(engine: Engine, requests: list[WorkloadRequest]) -> float:
    own = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    os.sched_setaffinity(0, {WORKER_CPU})
    torch.set_num_threads(1)
    try:
        params = SamplingParams(max_tokens=requests[0].max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outputs = engine.generate([list(r.prompt_token_ids) for r in requests], params)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, own)
    return sum(len(o.token_ids) for o in outputs) / elapsed


def _stack_tps(cluster: BenchCluster, requests: list[WorkloadRequest], direct_to: str | None = None) -> float:
    """Output tokens/s of `requests` at once through the gateway, or straight to the decode
    worker's gRPC Decode at `direct_to` (no gateway, no HTTP), from this thread, which the
    running cluster pins to core CLIENT_CPU."""
    prompts = [list(r.prompt_token_ids) for r in requests]
    if direct_to is not None:
        return asyncio.run(
            stream_direct(direct_to, prompts, requests[0].max_tokens, requests[0].request_id, cluster.token)
        )
    return asyncio.run(stream_via_gateway(cluster.url, cluster.model, prompts, requests[0].max_tokens))


def run(ctx: BenchContext) -> Section:
    concurrency, max_tokens, rounds = ctx.size(32, 4), ctx.size(64, 8), ctx.size(7, 1)
    engine = Engine.from_pretrained(ctx.model_dir, num_threads=1)
    _engine_tps(engine, _requests(-1, 2, 4))  # warm-up
    layouts = {
        "colocated": (WorkerSpec("decode", WORKER_CPU),),
        "disaggregated": (WorkerSpec("prefill", CLIENT_CPU), WorkerSpec("decode", WORKER_CPU)),
    }
    # each layout's rounds alternate with rounds of the in-process engine, its own baseline
    measured: dict[str, list[float]] = {
        name: []
        for name in (
            "engine (colocated rounds)",
            "colocated",
            "colocated, decode worker gRPC direct",
            "engine (disaggregated rounds)",
            "disaggregated",
        )
    }
    for layout, workers in layouts.items():
        ctx.log(f"stack: {layout}")
        local_max = 1_000_000 if layout == "colocated" else 0
        spec = ClusterSpec(
            ctx.model_dir,
            workers,
            gateway_cpu=CLIENT_CPU,
            local_prefill_max_tokens=local_max,
            admission=THROUGHPUT_ADMISSION,
        )
        with BenchCluster.start(spec) as cluster:
            _stack_tps(cluster, _requests(-1, 2, 4))  # warm-up
            for r in range(rounds):
                # fresh prompts in every round of either layout: the in-process engine keeps its
                # prefix cache across rounds, and a prompt it saw before would skip its prefill
                requests = _requests(r if layout == "colocated" else 200 + r, concurrency, max_tokens)
                measured[f"engine ({layout} rounds)"].append(_engine_tps(engine, requests))
                if layout == "colocated":  # the worker's own gRPC streams, without the gateway
                    (address,) = cluster.worker_addresses.values()
                    direct = _requests(100 + r, concurrency, max_tokens)  # fresh prompts: no cache hits
                    measured["colocated, decode worker gRPC direct"].append(_stack_tps(cluster, direct, address))
                measured[layout].append(_stack_tps(cluster, requests))
    median = {name: statistics.median(values) for name, values in measured.items()}
    rows = [("path", "output tokens/s (median)", "rounds")]
    rows += [(name, f"{median[name]:.0f}", ", ".join(f"{v:.0f}" for v in values)) for name, values in measured.items()]
    engine_colocated, engine_disaggregated = (
        median["engine (colocated rounds)"],
        median["engine (disaggregated rounds)"],
    )
    figures = (
        Figure("full stack (colocated) / in-process engine", median["colocated"] / engine_colocated, goal=GOAL),
        Figure(
            "full stack (disaggregated) / in-process engine",
            median["disaggregated"] / engine_disaggregated,
            goal=DISAGG_GOAL,
        ),
        Figure(
            "decode worker over gRPC, no gateway / in-process engine",
            median["colocated, decode worker gRPC direct"] / engine_colocated,
        ),
        Figure(
            "full stack (colocated) / decode worker over gRPC",
            median["colocated"] / median["colocated, decode worker gRPC direct"],
        ),
    )
    cost = ctx.gpu_hour_cost
    gpus = {"colocated": {"decode": 1}, "disaggregated": {"prefill": 1, "decode": 1}}
    rows += [("cost", "$ per million output tokens", "$ per million tokens (prompt + output)")]
    for layout, counts in gpus.items():
        dollars = cost.per_gpu_dollars_per_hour(counts)
        total_tps = median[layout] * (PROMPT_LEN + max_tokens) / max_tokens
        rows.append(
            (
                f"{layout} ({'+'.join(f'{n} {pool}' for pool, n in counts.items())} at {cost} $/GPU-hour)",
                f"{dollars_per_million(dollars, median[layout]):.2f}",
                f"{dollars_per_million(dollars, total_tps):.2f}",
            )
        )
    setup = (
        f"{concurrency} requests at once per round ({PROMPT_LEN}-token prompts, {max_tokens} output tokens, "
        f"greedy, ignore EOS), median of {rounds} rounds, each layout's alternating with rounds of the "
        f"in-process engine (its baseline); decode worker and in-process engine on core "
        f"{WORKER_CPU} with one torch thread; gateway, clients (and the prefill worker, when "
        f"disaggregated) on core {CLIENT_CPU}. Cost: each worker is priced as one GPU at `--gpu-hour-cost`, "
        "over the median output tokens/s (a CPU worker's throughput, so the dollars are illustrative; "
        "the ratio between layouts is the figure)."
    )
    return Section("stack", "Full stack through the gateway vs the in-process engine", setup, figures, tuple(rows))
