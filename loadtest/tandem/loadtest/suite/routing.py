"""Prefix-aware vs round-robin routing on the shared-prompt workload (`workloads/shared_prefix.yaml`).

What it shows: the prefix-aware policy sends a prompt to the prefill worker that already holds
its group's system prompt, so it hits the prefix cache about as often as one cache shared by
every worker would (the *oracle*); round-robin spreads each group over both prefill workers and
recomputes a system prompt once per worker it lands on.

Setup, per policy, on the bench model: two prefill workers, one per core; the decode worker on
core 0 and the gateway with the load generator on core 1, beside them (with 4 output tokens
they do little). `local_prefill_max_tokens` is 0, so every prompt is prefilled on a prefill
worker and the hit that the gateway reports (`usage.prompt_tokens_details.cached_tokens`) is
the prefill worker's own prefix-cache hit at admission (the routing decision under test is
the choice of prefill worker).

Load, and why the oracle is fair:
1. The workload's groups are assigned i % num_prefixes, so with 2 workers round-robin would
   keep every group on one worker by accident. The requests after the warm-up are shuffled
   with a seeded RNG.
2. Warm-up: the first request of each group, closed loop at concurrency 2. They are excluded
   from the numerator and the denominator of both hit rates; they only fill the caches (and
   count as "earlier requests" for the oracle). Not one at a time: when prefix_aware broke
   ties by worker id, a sequential warm-up (every worker idle at each decision) put all groups
   on one prefill worker, and the measured phase queued on it while the other idled (measured
   then: TTFT p50 round_robin / prefix_aware 0.63). Ties now rotate by request seq, but groups
   still arrive together here, as they would in service.
3. Then the shuffled requests, closed loop at concurrency 2 (one per prefill worker). Every
   prompt has the same length, so every system-prompt prefix already sits in a cache after
   step 2: no request can share more with a request still in flight than with a warm-up one,
   and the ideal system could hit the whole oracle even at concurrency 2.
Oracle: per request in send order, the longest prefix of whole blocks (16 tokens) it shares
with any earlier request, capped at the blocks before its last token (a worker always computes
the last prompt token, `Batcher._prefix_hit`); summed over the measured requests and divided
by their prompt tokens. It is what one infinite cache would hit.

Figures: each policy's hit rate / oracle hit rate (goal for prefix_aware: >= 0.90), and TTFT
(p50 and mean) round_robin / prefix_aware, without a goal.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Sequence
from itertools import takewhile
from pathlib import Path

from tandem.common.block_hash import block_extra, hash_blocks
from tandem.loadtest.arrivals import ClosedLoop
from tandem.loadtest.metrics import percentile
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.suite.cluster import BenchCluster, ClusterSpec, WorkerSpec
from tandem.loadtest.suite.context import BenchContext, drive
from tandem.loadtest.suite.figures import Direction, Figure, Section
from tandem.loadtest.workloads import LengthRange, SharedPrefixWorkload, load_workload

GOAL = 0.90
BLOCK_SIZE = 16
POLICIES = ("prefix_aware", "round_robin")
PREFILL_CPUS, DECODE_CPU, GATEWAY_CPU = (0, 1), 0, 1
NUM_PREFIXES = 8
PROMPT_LEN = 1024
OUTPUT_LEN = 4
CONCURRENCY = 2
SHUFFLE_SEED = 7


def oracle_hit_tokens(prompts: Sequence[Sequence[int]], block_size: int) -> tuple[int, ...]:
    """Per prompt, in order: the tokens one infinite prefix cache would serve it.

    That is the longest run of whole leading blocks it shares with any earlier prompt, at most
    (len - 1) // block_size blocks (the last prompt token is always computed), times
    block_size. Blocks are compared by the cluster's chained block hashes (DESIGN.md section
    4), so a block matches only when everything before it does too. Pure.
    """
    extra = block_extra("oracle")
    seen: set[int] = set()  # the block hashes of every earlier prompt
    hits = []
    for prompt in prompts:
        hashes = hash_blocks(prompt, block_size, extra)
        usable = hashes[: (len(prompt) - 1) // block_size]
        hits.append(sum(1 for _ in takewhile(seen.__contains__, usable)) * block_size)
        seen.update(hashes)
    return tuple(hits)


def hit_rate(records: Sequence[RequestRecord]) -> float:
    """sum(cached_tokens) / sum(prompt_tokens); a record without cached_tokens is an error."""
    missing = [r.request_id for r in records if r.cached_tokens is None]
    if missing:
        raise RuntimeError(f"the gateway reported no cached_tokens for {missing[:5]}")
    return sum(r.cached_tokens or 0 for r in records) / sum(r.prompt_tokens for r in records)


def requests(num_measured: int) -> tuple[list[WorkloadRequest], list[WorkloadRequest]]:
    """(warm-up: one request per group, in group order; the measured requests, shuffled)."""
    path = Path(__file__).resolve().parent.parent / "workloads" / "shared_prefix.yaml"
    workload = load_workload(path)
    assert isinstance(workload, SharedPrefixWorkload)
    workload = dataclasses.replace(
        workload,
        num_prefixes=NUM_PREFIXES,
        input_len=LengthRange(PROMPT_LEN, PROMPT_LEN),
        output_len=LengthRange(OUTPUT_LEN, OUTPUT_LEN),
    )
    generated = list(workload.generate(NUM_PREFIXES + num_measured, seed=0))
    warmup, measured = generated[:NUM_PREFIXES], generated[NUM_PREFIXES:]
    random.Random(SHUFFLE_SEED).shuffle(measured)
    return warmup, measured


def _measure(
    ctx: BenchContext, policy: str, warmup: list[WorkloadRequest], measured: list[WorkloadRequest]
) -> tuple[tuple[RequestRecord, ...], float, float]:
    """(records of the measured requests in send order, duration s, gateway hit ratio of the
    measured phase from `tandem_prefix_cache_*_tokens_total`)."""
    workers = (*(WorkerSpec("prefill", cpu) for cpu in PREFILL_CPUS), WorkerSpec("decode", DECODE_CPU))
    spec = ClusterSpec(ctx.model_dir, workers, gateway_cpu=GATEWAY_CPU, policy=policy, local_prefill_max_tokens=0)
    with BenchCluster.start(spec) as cluster:
        drive(cluster.url, cluster.model, warmup, ClosedLoop(CONCURRENCY))
        before = cluster.metrics()
        result = drive(cluster.url, cluster.model, measured, ClosedLoop(CONCURRENCY))
        after = cluster.metrics()
        routed = after.get(f"tandem_routing_decisions_total{{kind=local_prefill,policy={policy}}}", 0.0)
        if routed:
            raise RuntimeError(f"{policy}: {routed:g} requests were prefilled locally; the hit rate would be wrong")
    query, hit = ("tandem_prefix_cache_query_tokens_total{}", "tandem_prefix_cache_hit_tokens_total{}")
    gateway_ratio = (after[hit] - before[hit]) / (after[query] - before[query])
    return result.records, result.duration_s, gateway_ratio  # records come back in send order


def run(ctx: BenchContext) -> Section:
    warmup, measured = requests(ctx.size(64, 12))
    hits = oracle_hit_tokens([r.prompt_token_ids for r in (*warmup, *measured)], BLOCK_SIZE)[len(warmup) :]
    oracle = sum(hits) / sum(len(r.prompt_token_ids) for r in measured)
    rows = [
        (
            "policy",
            "hit rate",
            "oracle hit rate",
            "hit rate / oracle",
            "gateway counters' hit rate",
            "TTFT p50 (ms)",
            "TTFT mean (ms)",
            "measured phase (s)",
        )
    ]
    ratios, ttfts = {}, {}
    for policy in POLICIES:
        ctx.log(f"routing: {policy}")
        records, duration_s, gateway_ratio = _measure(ctx, policy, warmup, measured)
        rate = hit_rate(records)
        ratios[policy] = rate / oracle
        ttft_s = [r.ttft_s for r in records if r.ttft_s is not None]
        ttfts[policy] = (percentile(ttft_s, 50), statistics.fmean(ttft_s))
        rows.append(
            (
                policy,
                f"{rate:.3f}",
                f"{oracle:.3f}",
                f"{rate / oracle:.3f}",
                f"{gateway_ratio:.3f}",
                f"{1000 * ttfts[policy][0]:.0f}",
                f"{1000 * ttfts[policy][1]:.0f}",
                f"{duration_s:.1f}",
            )
        )
    pa, rr = ttfts["prefix_aware"], ttfts["round_robin"]
    figures = (
        Figure(
            "prefix_aware: prefix-cache hit rate / oracle",
            ratios["prefix_aware"],
            goal=GOAL,
            direction=Direction.AT_LEAST,
        ),
        Figure("round_robin: prefix-cache hit rate / oracle", ratios["round_robin"]),
        Figure("TTFT p50: round_robin / prefix_aware", rr[0] / pa[0]),
        Figure("TTFT mean: round_robin / prefix_aware", rr[1] / pa[1]),
    )
    setup = (
        f"shared_prefix workload: {NUM_PREFIXES} groups, {PROMPT_LEN}-token prompts of which 75% "
        f"({int(0.75 * PROMPT_LEN)} tokens) is the group's system prompt, {OUTPUT_LEN} output tokens. "
        f"Warm-up: one request per group at concurrency {CONCURRENCY} (not counted); then "
        f"{len(measured)} requests shuffled (seed {SHUFFLE_SEED}), closed loop at concurrency "
        f"{CONCURRENCY}. Prefill workers on cores {PREFILL_CPUS[0]} and {PREFILL_CPUS[1]}, decode worker "
        f"on core {DECODE_CPU}, gateway and load generator on core {GATEWAY_CPU}; "
        "local_prefill_max_tokens 0 (every prompt goes to a prefill worker); one torch thread per worker. "
        "Oracle: longest whole-block prefix shared with any earlier request (one infinite cache)."
    )
    notes = (
        "hit rate = sum(cached_tokens) / sum(prompt_tokens) of the measured requests, from the gateway's "
        "usage (the prefill worker's hit); the gateway counters' column is the same quantity from "
        "`tandem_prefix_cache_*_tokens_total`, as a cross-check.",
    )
    return Section("routing", "Prefix-aware vs round-robin routing", setup, figures, tuple(rows), notes)
