"""The gateway's routing path in the simulator, in two interchangeable forms.

- `ExactRouter` runs the gateway's own code: `scheduler.routing.route_on` on a
  `RegistrySnapshot`, a `PrefixIndex` and an `InflightTable`, as `Scheduler.route` does.
  Its cost grows with the number of workers in Python (the views, the inflight adjustment and
  the policy loop visit every worker per request), which is fine up to about a hundred workers.
- `VectorRouter` computes the same decision for the `prefix_aware` policy with numpy arrays
  over the workers: the loads of the last refresh, this gateway's in-flight work (the
  `InflightTable` rules), the `prefix_aware_cost` formula with the same floating-point
  operations in the same order, `PrefixAware`'s load bound, the lowest-cost worker with ties
  rotated by the request's seq over the tied ids, and the picker's conditional-disaggregation
  rule. It keeps the real `PrefixIndex` (match, claims,
  expiry). A test replays a run through the real `Scheduler` and gets the same decisions.

Both: `refresh` (the registry refresher's new snapshot), `route`, `prefill_done`,
`decode_done`, called by the event loop exactly as the gateway calls the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tandem.common.workers import KVEventRecord, WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.index import PrefixIndex
from tandem.scheduler.inflight import InflightTable
from tandem.scheduler.policies import LOAD_BOUND_FACTOR, LOAD_BOUND_SLACK, UNCACHED_WEIGHT, PrefixAware, make_policy
from tandem.scheduler.registry import RegistrySnapshot
from tandem.scheduler.routing import prefilled_by, route_on, uncached_prefill_tokens
from tandem.scheduler.types import NoWorkerError, RouteDecision, RouteKind, RouteRequest


class Router(Protocol):
    index: PrefixIndex

    def refresh(self, now_s: float, workers: Sequence[tuple[WorkerInfo, WorkerLoad]]) -> None: ...

    def route(self, request: RouteRequest, now_s: float, group: int | None) -> RouteDecision: ...

    def stored(self, event: KVEventRecord, group: int) -> None: ...

    def prefill_done(self, decision: RouteDecision, num_prompt_tokens: int, now_s: float) -> None: ...

    def decode_done(self, decision: RouteDecision, now_s: float) -> None: ...


class ExactRouter:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.index = PrefixIndex(config.speculative_ttl_s)
        self._policy = make_policy(config.policy)
        self._inflight = InflightTable()
        self._snapshot = RegistrySnapshot.of((), {}, 0.0)

    def refresh(self, now_s: float, workers: Sequence[tuple[WorkerInfo, WorkerLoad]]) -> None:
        self._snapshot = RegistrySnapshot.of((i for i, _ in workers), {i.worker_id: ld for i, ld in workers}, now_s)
        live = set(self._snapshot.worker_ids)
        for worker_id in self._inflight.touched() - live:  # Scheduler._swap
            self._inflight.forget(worker_id)

    def route(self, request: RouteRequest, now_s: float, group: int | None) -> RouteDecision:
        return route_on(self._snapshot, self.index, request, self._policy, self.config, now_s, inflight=self._inflight)

    def stored(self, event: KVEventRecord, group: int) -> None:
        self.index.apply(event)

    def prefill_done(self, decision: RouteDecision, num_prompt_tokens: int, now_s: float) -> None:
        self._inflight.prefill_done(
            prefilled_by(decision), uncached_prefill_tokens(decision, num_prompt_tokens), now_s, num_prompt_tokens
        )

    def decode_done(self, decision: RouteDecision, now_s: float) -> None:
        self._inflight.decode_done(decision.decode.worker_id, now_s)


class _Pool:
    """One pool's workers at the last refresh (sorted by id) and their published loads."""

    def __init__(self, workers: Sequence[tuple[WorkerInfo, WorkerLoad]], slots: dict[str, int]) -> None:
        ordered = sorted(workers, key=lambda w: w[0].worker_id)
        self.infos = [info for info, _ in ordered]
        self.ids = [info.worker_id for info in self.infos]
        self.slot = np.array([slots[w] for w in self.ids], dtype=np.int64)
        self.position = {w: i for i, w in enumerate(self.ids)}

        def column(name: str, dtype: type) -> np.ndarray:
            return np.array([getattr(load, name) for _, load in ordered], dtype=dtype)

        self.queued = column("queued_prefill_tokens", np.int64)
        self.running = column("running", np.int64)
        self.waiting = column("waiting", np.int64)
        self.used = column("kv_blocks_used", np.float64)
        self.total = column("kv_blocks_total", np.float64)
        self.timestamp = column("timestamp_s", np.float64)


class VectorRouter:
    """`route_on` + `PrefixAware` on arrays (module docstring). Only for `prefix_aware`."""

    def __init__(self, config: SchedulerConfig, max_workers: int = 1 << 16) -> None:
        if make_policy(config.policy).name != PrefixAware.name:
            raise ValueError(f"the vectorised router implements prefix_aware only, not {config.policy!r}")
        self.config = config
        self.index = PrefixIndex(config.speculative_ttl_s)
        self._slots: dict[str, int] = {}
        # the InflightTable, by worker slot; last_done -inf: none yet
        self._tokens = np.zeros(max_workers, dtype=np.int64)
        self._prompt_tokens = np.zeros(max_workers, dtype=np.int64)
        self._streams = np.zeros(max_workers, dtype=np.int64)
        self._last_done = np.full(max_workers, -np.inf)
        self._pools = {role: _Pool((), {}) for role in WorkerRole}
        self._live: frozenset[str] = frozenset()
        self._holders: dict[int, set[str]] = {}  # group -> workers that stored or claimed its blocks

    def refresh(self, now_s: float, workers: Sequence[tuple[WorkerInfo, WorkerLoad]]) -> None:
        for info, _ in workers:
            self._slots.setdefault(info.worker_id, len(self._slots))
        live = {info.worker_id for info, _ in workers}
        for worker_id, slot in self._slots.items():
            if worker_id not in live:  # Scheduler._swap: forget the in-flight work of the gone
                self._tokens[slot] = self._prompt_tokens[slot] = self._streams[slot] = 0
                self._last_done[slot] = -np.inf
        for role in WorkerRole:
            self._pools[role] = _Pool([w for w in workers if w[0].role is role], self._slots)
        self._live = frozenset(live)

    def _pick(self, pool: _Pool, cached: np.ndarray, num_tokens: int, tokens_per_seq: int, seq: int) -> int:
        """`PrefixAware.pick` over the pool: the position of the chosen worker."""
        cfg = self.config
        uncached = np.maximum(num_tokens - cached * cfg.block_size, 0)
        slot = pool.slot
        published = np.where(pool.timestamp <= self._last_done[slot], 0, pool.queued)
        others = np.maximum(published - self._prompt_tokens[slot], 0)  # InflightTable.adjust
        queued = self._tokens[slot] + others
        if tokens_per_seq:
            running = np.maximum(pool.running, self._streams[slot])
            queued = queued + (running + pool.waiting) * tokens_per_seq
        bound = LOAD_BOUND_FACTOR * int(queued.sum()) / len(queued) + LOAD_BOUND_SLACK * num_tokens
        kv_weight_tokens = cfg.kv_weight * num_tokens
        with np.errstate(divide="ignore", invalid="ignore"):
            kv_term = np.where(pool.total > 0, kv_weight_tokens * pool.used / pool.total, 0.0)
        cost = (UNCACHED_WEIGHT * uncached).astype(np.float64) + cfg.queue_weight * queued.astype(np.float64) + kv_term
        cost = np.where(queued > bound, np.inf, cost)
        tied = np.flatnonzero(cost == cost.min())  # ids are sorted: the tie rotates over them
        return int(tied[seq % len(tied)])

    def _cached(self, pool: _Pool, matched: dict[str, int]) -> np.ndarray:
        cached = np.zeros(len(pool.ids), dtype=np.int64)
        for worker_id, n in matched.items():
            i = pool.position.get(worker_id)
            if n and i is not None:
                cached[i] = n
        return cached

    def stored(self, event: KVEventRecord, group: int) -> None:
        self.index.apply(event)
        self._holders.setdefault(group, set()).add(event.worker_id)

    def route(self, request: RouteRequest, now_s: float, group: int | None) -> RouteDecision:
        """`route_on`'s decision. `group` is the request's prefix group: only the workers that
        stored or were routed that group's blocks can hold any of the prompt (sim/hashes.py),
        so only they are matched against the index (`match` is per worker, so the counts are
        those of a match over all workers, at a fraction of its cost)."""
        cfg, bs = self.config, self.config.block_size
        self.index.expire(now_s)
        matched: dict[str, int] = {}
        if group is not None and group in self._holders:
            live = self._live
            holders = sorted(w for w in self._holders[group] if w in live)
            matched = {w: n for w, n in self.index.match(request.block_hashes, holders).items() if n}
        decode, prefill = self._pools[WorkerRole.DECODE], self._pools[WorkerRole.PREFILL]
        if not decode.ids:
            raise NoWorkerError(f"no routable decode worker for request {request.request_id} (0 live, 0 excluded)")
        t = request.num_prompt_tokens
        d_cached = self._cached(decode, matched)
        d = self._pick(decode, d_cached, t, bs, request.seq)
        decode_cached = min(t, int(d_cached[d]) * bs)
        d_info = decode.infos[d]
        if not prefill.ids or t - decode_cached < cfg.local_prefill_max_tokens:
            decision = RouteDecision(RouteKind.LOCAL_PREFILL, d_info, None, decode_cached, 0)
        else:
            p_cached = self._cached(prefill, matched)
            p = self._pick(prefill, p_cached, t, 0, request.seq)
            prefill_cached = min(t, int(p_cached[p]) * bs)
            decision = RouteDecision(RouteKind.DISAGGREGATED, d_info, prefill.infos[p], decode_cached, prefill_cached)
        for worker in (decision.prefill, decision.decode):
            if worker is not None:
                self.index.add_speculative(worker.worker_id, request.block_hashes, now_s)
                if group is not None:
                    self._holders.setdefault(group, set()).add(worker.worker_id)
        self._tokens[self._slots[prefilled_by(decision)]] += uncached_prefill_tokens(decision, t)
        self._prompt_tokens[self._slots[prefilled_by(decision)]] += t
        self._streams[self._slots[d_info.worker_id]] += 1
        return decision

    def prefill_done(self, decision: RouteDecision, num_prompt_tokens: int, now_s: float) -> None:
        slot = self._slots[prefilled_by(decision)]
        self._tokens[slot] = max(0, int(self._tokens[slot]) - uncached_prefill_tokens(decision, num_prompt_tokens))
        self._prompt_tokens[slot] = max(0, int(self._prompt_tokens[slot]) - num_prompt_tokens)
        self._last_done[slot] = now_s

    def decode_done(self, decision: RouteDecision, now_s: float) -> None:
        slot = self._slots[decision.decode.worker_id]
        self._streams[slot] = max(0, int(self._streams[slot]) - 1)
        self._last_done[slot] = now_s


def make_router(config: SchedulerConfig, vectorised: bool) -> Router:
    return VectorRouter(config) if vectorised else ExactRouter(config)
