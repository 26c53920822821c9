"""Prefix-cache TTFT speedup against the ideal 1 / (1 - f).

What it shows: a prompt whose first f of tokens are already in the prefix cache costs only its
uncached (1 - f) to prefill, so its TTFT should approach the cold TTFT times (1 - f). The figure
is the measured speedup over that ideal (goal: >= 0.70); what is missing is the per-request
work that does not shrink with the prompt (HTTP, routing, gRPC, the first token's sampling).

Setup, on the bench model: one prefill worker alone on core 0; the decode worker, the gateway
and the load generator on core 1. `local_prefill_max_tokens` is 0, so every prompt is prefilled
on the prefill worker: TTFT = routing + Prefill RPC (the KV transfer is not on the TTFT path).
A prefill worker is the path where prefill has a core to itself, as in the disaggregated
deployments this measures; the colocated path reports its hits the same way (the first
decode message's `num_cached_tokens`).

Load, sequential (closed loop, concurrency 1):
1. Warm-up: one cold prompt (the worker's first request is slower), then the shared prefix
   alone (f * N tokens, whole blocks), which puts it in the prefill worker's cache.
2. Cold and warm prompts, interleaved: a cold prompt is N fresh random tokens; a warm prompt
   is the shared prefix then N - f * N fresh tokens.
speedup = median cold TTFT / median warm TTFT. The section fails (RuntimeError) unless every
warm request reports exactly f * N cached tokens and every cold one 0: a benchmark that
silently measured misses would lie.
"""

from __future__ import annotations

import statistics

from tandem.loadtest.arrivals import ClosedLoop
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.suite.cluster import BenchCluster, ClusterSpec, WorkerSpec
from tandem.loadtest.suite.context import BenchContext, drive
from tandem.loadtest.suite.figures import Direction, Figure, Section
from tandem.loadtest.workloads import LengthRange, RandomWorkload, SharedPrefixWorkload

GOAL = 0.70
BLOCK_SIZE = 16
PROMPT_LEN = 1024
SHARED_FRACTION = 0.75
OUTPUT_LEN = 2
PREFILL_CPU, SHARED_CPU = 0, 1


def ideal_speedup(shared_fraction: float) -> float:
    """TTFT speedup if prefill time were proportional to the uncached tokens: 1 / (1 - f)."""
    if not 0.0 <= shared_fraction < 1.0:
        raise ValueError(f"shared_fraction must be within [0, 1), got {shared_fraction}")
    return 1.0 / (1.0 - shared_fraction)


def interleave(cold: list[WorkloadRequest], warm: list[WorkloadRequest]) -> list[WorkloadRequest]:
    """cold[0], warm[0], cold[1], warm[1], ... (equal lengths)."""
    if len(cold) != len(warm):
        raise ValueError(f"need as many cold as warm requests, got {len(cold)} and {len(warm)}")
    return [r for pair in zip(cold, warm) for r in pair]


def requests(num_each: int) -> tuple[list[WorkloadRequest], list[WorkloadRequest], list[WorkloadRequest]]:
    """(warm-up, cold, warm): warm-up is a cold prompt and the shared prefix alone."""
    shared = SharedPrefixWorkload(
        LengthRange(PROMPT_LEN, PROMPT_LEN), LengthRange(OUTPUT_LEN, OUTPUT_LEN), SHARED_FRACTION
    )
    prefix = shared.system_prompts(seed=0)[0][: int(SHARED_FRACTION * PROMPT_LEN)]
    warm = [
        WorkloadRequest(f"warm-{i}", r.prompt_token_ids, OUTPUT_LEN, class_name="warm")
        for i, r in enumerate(shared.generate(num_each, seed=0))
    ]
    cold = [
        WorkloadRequest(f"cold-{i}", r.prompt_token_ids, OUTPUT_LEN, class_name="cold")
        for i, r in enumerate(RandomWorkload(shared.input_len, shared.output_len).generate(num_each + 1, seed=1))
    ]
    warmup = [cold.pop(), WorkloadRequest("prefix", prefix, OUTPUT_LEN, class_name="prefix")]
    return warmup, cold, warm


def check_hits(records: list[RequestRecord], expected: int) -> None:
    """RuntimeError unless every record reports exactly `expected` cached tokens."""
    wrong = [(r.request_id, r.cached_tokens) for r in records if r.cached_tokens != expected]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} of {len(records)} requests did not report {expected} cached tokens "
            f"(first: {wrong[:3]}); the TTFTs would not measure what they claim"
        )


def run(ctx: BenchContext) -> Section:
    num_each = ctx.size(16, 3)
    warmup, cold, warm = requests(num_each)
    shared_tokens = len(warmup[1].prompt_token_ids)
    if shared_tokens % BLOCK_SIZE:
        raise RuntimeError(f"the shared prefix ({shared_tokens} tokens) is not whole blocks of {BLOCK_SIZE}")
    workers = (WorkerSpec("prefill", PREFILL_CPU), WorkerSpec("decode", SHARED_CPU))
    spec = ClusterSpec(ctx.model_dir, workers, gateway_cpu=SHARED_CPU, local_prefill_max_tokens=0)
    ctx.log("prefix_cache: cold and warm prompts")
    with BenchCluster.start(spec) as cluster:
        drive(cluster.url, cluster.model, warmup, ClosedLoop(1))
        result = drive(cluster.url, cluster.model, interleave(cold, warm), ClosedLoop(1))
    by_class = {
        "cold": [r for r in result.records if r.request_id.startswith("cold-")],
        "warm": [r for r in result.records if r.request_id.startswith("warm-")],
    }
    check_hits(by_class["cold"], 0)
    check_hits(by_class["warm"], shared_tokens)
    ttft_ms = {name: statistics.median(1000 * (r.ttft_s or 0.0) for r in records) for name, records in by_class.items()}
    speedup = ttft_ms["cold"] / ttft_ms["warm"]
    f = shared_tokens / PROMPT_LEN
    ideal = ideal_speedup(f)
    warm_hit = sum(r.cached_tokens or 0 for r in by_class["warm"]) / sum(r.prompt_tokens for r in by_class["warm"])
    figures = (
        Figure("warm/cold TTFT speedup / ideal 1/(1-f)", speedup / ideal, goal=GOAL, direction=Direction.AT_LEAST),
        Figure("warm/cold TTFT speedup (median cold / median warm)", speedup),
        Figure("warm requests' prefix-cache hit rate (cached / prompt tokens)", warm_hit, unit=""),
    )
    rows = [("prompts", "count", "cached tokens each", "TTFT p50 (ms)", "TTFT min (ms)", "TTFT max (ms)")]
    for name, records in by_class.items():
        ttfts = [1000 * (r.ttft_s or 0.0) for r in records]
        rows.append(
            (
                name,
                str(len(records)),
                str(records[0].cached_tokens),
                f"{ttft_ms[name]:.1f}",
                f"{min(ttfts):.1f}",
                f"{max(ttfts):.1f}",
            )
        )
    setup = (
        f"{num_each} cold prompts ({PROMPT_LEN} fresh tokens) and {num_each} warm prompts (the same "
        f"{shared_tokens}-token prefix, f = {f:g}, then {PROMPT_LEN - shared_tokens} fresh tokens), "
        f"{OUTPUT_LEN} output tokens, interleaved, sequential; the prefix was sent alone first. Prefill worker "
        f"alone on core {PREFILL_CPU}; decode worker, gateway and load generator on core {SHARED_CPU}; "
        f"local_prefill_max_tokens 0 (every prompt prefilled on the prefill worker); one torch thread per "
        f"worker. Ideal speedup 1/(1-f) = {ideal:g}."
    )
    return Section("prefix_cache", "Prefix-cache TTFT speedup", setup, figures, tuple(rows))
