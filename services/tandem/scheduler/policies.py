"""Routing policies: pick one worker of a pool for a request (DESIGN.md section 5).

Caller: `picker.decide`, once for the decode pool and, when it disaggregates, once for the
prefill pool. The candidates are non-empty and already filtered (live, not excluded, and for the
prefill pool fingerprint-compatible with the chosen decode worker). A policy is stateless and
pure: the same (request, candidates, pool, config) always gives the same worker, so decisions
can be tested with tables and replayed in a simulator. Ties are broken by worker id, except in
`PrefixAware`, which rotates them by the request's seq.

A worker whose `load` is None (registered, no load published yet) counts as idle.
Policies are chosen by name through `POLICIES` / `make_policy`; `SchedulerConfig.policy` names one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

from tandem.common.workers import WorkerRole
from tandem.scheduler.types import RouteRequest, WorkerView


class PolicyConfig(Protocol):
    """What a policy reads of `SchedulerConfig` (config.py). A protocol, not the class: the
    config validates its policy name against `POLICIES`, so it imports this module, never the
    reverse."""

    @property
    def block_size(self) -> int: ...

    @property
    def queue_weight(self) -> float: ...

    @property
    def kv_weight(self) -> float: ...


class Policy(Protocol):
    """Picks one of `candidates` (non-empty) for `request` in `pool`. Pure; never mutates."""

    name: str

    def pick(
        self,
        request: RouteRequest,
        candidates: Sequence[WorkerView],
        pool: WorkerRole,
        config: PolicyConfig,
    ) -> WorkerView: ...


class RoundRobin:
    """Candidates sorted by worker id; take index `request.seq % len(candidates)`."""

    name = "round_robin"

    def pick(
        self,
        request: RouteRequest,
        candidates: Sequence[WorkerView],
        pool: WorkerRole,
        config: PolicyConfig,
    ) -> WorkerView:
        ordered = sorted(candidates, key=lambda view: view.info.worker_id)
        return ordered[request.seq % len(ordered)]


class LeastLoaded:
    """Min by (waiting + running, queued prefill tokens, KV cache usage, worker id).

    Ignores the prefix cache and the pool: the same rule for prefill and decode.
    """

    name = "least_loaded"

    def pick(
        self,
        request: RouteRequest,
        candidates: Sequence[WorkerView],
        pool: WorkerRole,
        config: PolicyConfig,
    ) -> WorkerView:
        def key(view: WorkerView) -> tuple[int, int, float, str]:
            load = view.load
            if load is None:
                return (0, 0, 0.0, view.info.worker_id)
            return (load.waiting + load.running, load.queued_prefill_tokens, load.kv_cache_usage, view.info.worker_id)

        return min(candidates, key=key)


# The uncached tokens' weight in `prefix_aware_cost`: a miss is paid twice, by the request
# itself (its prefill) and by the requests queued after it on that worker (the same prefill
# delays them). With weight 1 the cost is the request's own TTFT alone, and under load it sends
# a hot prefix's requests to a worker with a slightly shorter queue that misses: the misses add
# work, the queues grow, more requests miss (measured, `routing_zipf` at load 3.2: 0.76 of the
# oracle's hits with weight 1, 0.95 with weight 2). Balance is the load bound's job.
UNCACHED_WEIGHT = 2

# The load bound of `PrefixAware`: a candidate whose load exceeds LOAD_BOUND_FACTOR times the
# candidates' mean load plus LOAD_BOUND_SLACK prompts (the slack keeps near-idle workers, whose
# mean is a few tokens, from bouncing every request) is not picked.
LOAD_BOUND_FACTOR = 1.5
LOAD_BOUND_SLACK = 0.5


def prefix_aware_cost(request: RouteRequest, view: WorkerView, pool: WorkerRole, config: PolicyConfig) -> float:
    """The `PrefixAware` cost of sending `request` to `view`, in token units (lower is better).

    With T = num_prompt_tokens, B = block_size, W = UNCACHED_WEIGHT, and an absent load
    counting as all zeros:

        uncached = max(0, T - num_cached_blocks * B)
        prefill pool: cost = W * uncached
                           + queue_weight * queued_prefill_tokens
                           + kv_weight * kv_cache_usage * T
        decode pool:  cost = W * uncached
                           + queue_weight * (queued_prefill_tokens + (running + waiting) * B)
                           + kv_weight * kv_cache_usage * T

    Why the decode term: a decode worker also prefills (local prefill, and the tails it does
    not pull), so its queued prefill tokens delay admission just as on P; on top of that every
    running or waiting sequence takes a share of each decode step, charged as one block of
    tokens. The KV term makes a nearly full worker (which would evict or preempt) look as
    expensive as recomputing the prompt scaled by its usage. W: see UNCACHED_WEIGHT.
    """
    tokens_per_seq = config.block_size if pool is WorkerRole.DECODE else 0
    return _cost(
        view,
        request.num_prompt_tokens,
        config.block_size,
        config.queue_weight,
        config.kv_weight * request.num_prompt_tokens,
        _queued(view, tokens_per_seq),
    )


def _queued(view: WorkerView, tokens_per_seq: int) -> int:
    """The queue term of `prefix_aware_cost` before `queue_weight`: the load the bound compares."""
    load = view.load
    if load is None:
        return 0
    return load.queued_prefill_tokens + (load.running + load.waiting) * tokens_per_seq


def _cost(
    view: WorkerView,
    num_prompt_tokens: int,
    block_size: int,
    queue_weight: float,
    kv_weight_tokens: float,
    queued: int,
) -> float:
    """`prefix_aware_cost` with the per-request factors hoisted out (it runs per candidate)."""
    uncached = num_prompt_tokens - view.num_cached_blocks * block_size
    if uncached < 0:
        uncached = 0
    load = view.load
    if load is None:
        return float(UNCACHED_WEIGHT * uncached)
    total = load.kv_blocks_total  # kv_cache_usage, inlined
    kv_term = kv_weight_tokens * load.kv_blocks_used / total if total else 0.0
    return UNCACHED_WEIGHT * uncached + queue_weight * queued + kv_term


class PrefixAware:
    """Min by `prefix_aware_cost` among the candidates within the load bound: trades cached
    prefix against queue and KV use, and never piles a hot prefix on one worker. Ties rotate
    by `request.seq` over the tied candidates sorted by worker id.

    The default policy. See `prefix_aware_cost` for the exact formula per pool.

    Load bound (consistent hashing with bounded loads, Mirrokni et al. 2018, with tokens for
    balls): with L(w) the queue term of the cost (queued prefill tokens, plus one block per
    running or waiting sequence on a decode worker), a candidate with
    L(w) > LOAD_BOUND_FACTOR * mean(L) + LOAD_BOUND_SLACK * num_prompt_tokens is skipped;
    the least loaded candidate is always within it. Why: the cost keeps a hot prefix on the
    worker that holds it until that worker's queue exceeds the cost of a miss elsewhere; the
    bound sends the next request of that prefix to a second worker, which misses once and then
    shares the prefix (`routing_zipf`, load 1.4: max/mean queued tokens 1.41 without it, 1.11
    with it).

    Why ties rotate: with idle workers every prompt nobody holds costs the same everywhere, and
    breaking that tie by worker id sent every new prefix to the first worker (`routing_zipf`,
    load 1.4: that worker carried 2.2x the mean load).
    """

    name = "prefix_aware"

    def pick(
        self,
        request: RouteRequest,
        candidates: Sequence[WorkerView],
        pool: WorkerRole,
        config: PolicyConfig,
    ) -> WorkerView:
        # Plain loops with hoisted factors: this runs for every live worker on every request.
        num_tokens, block_size = request.num_prompt_tokens, config.block_size
        queue_weight, kv_weight_tokens = config.queue_weight, config.kv_weight * num_tokens
        tokens_per_seq = block_size if pool is WorkerRole.DECODE else 0
        loads = [_queued(view, tokens_per_seq) for view in candidates]
        bound = LOAD_BOUND_FACTOR * sum(loads) / len(loads) + LOAD_BOUND_SLACK * num_tokens
        tied: list[WorkerView] = []
        best_cost = math.inf
        for view, queued in zip(candidates, loads):
            if queued > bound:
                continue
            cost = _cost(view, num_tokens, block_size, queue_weight, kv_weight_tokens, queued)
            if cost < best_cost:
                tied, best_cost = [view], cost
            elif cost == best_cost:
                tied.append(view)
        if len(tied) == 1:  # never empty: the least loaded candidate is within the bound
            return tied[0]
        tied.sort(key=lambda view: view.info.worker_id)
        return tied[request.seq % len(tied)]


# Immutable registry: name -> policy class (policies are stateless; one instance per scheduler).
POLICIES: Mapping[str, type[Policy]] = MappingProxyType(
    {
        RoundRobin.name: RoundRobin,
        LeastLoaded.name: LeastLoaded,
        PrefixAware.name: PrefixAware,
    }
)


def make_policy(name: str) -> Policy:
    """The policy registered under `name`; ValueError listing the valid names otherwise."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    return cls()
