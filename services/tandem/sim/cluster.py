"""The discrete-event simulation of a cluster, driven by the project's real decisions.

Lifecycle of a request (the gateway's, DESIGN.md section 2, on a simulated clock):
1. Arrival: the gateway's routing path (router.py: `scheduler.routing.route_on`, or its
   vectorised equal for large clusters) on the workers' loads as of the last refresh (every
   `refresh_interval_s`, as the scheduler's refresher does), a real `PrefixIndex` (fed with the
   workers' KV events for group prefixes, plus the speculative claims routing makes) and the
   gateway's in-flight work. The picker's conditional disaggregation rule decides local
   prefill vs (P, D).
2. Prefill: on P (a hand-off: done after its first token) or on D (local). The first token is
   the TTFT; the inflight table hears `prefill_done`.
3. Hand-off: the KV of the prompt tokens D does not hold travels for
   `CostModel.transfer_seconds(bytes)`; then P frees its blocks (`ReleaseKV`) and D reserves
   blocks for the prompt (or, when it cannot, prefills it again itself).
4. Decode on D until the request's output tokens are out; the inflight table hears
   `decode_done`.
Every `AutoscalerConfig.interval_s`, the real `autoscaler.policy.decide` reads the pools'
signals (`autoscaler.signals.pool_signals` over the workers' loads) and its decisions are
applied: new workers join after `startup_s`; removed ones stop taking requests at once and
leave when their work is done (drain).

Deterministic: no randomness and no wall clock; simultaneous events run in the order they
were scheduled.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from tandem.autoscaler.config import AutoscalerConfig
from tandem.autoscaler.policy import PolicyState, decide
from tandem.autoscaler.signals import pool_signals
from tandem.common.workers import KVEventKind, KVEventRecord, WorkerRole
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.types import NoWorkerError, RouteDecision, RouteKind, RouteRequest
from tandem.sim.accounting import summarize
from tandem.sim.hashes import group_block_hashes, prompt_block_hashes
from tandem.sim.pools import Pools
from tandem.sim.results import Records, SimResult, Slo
from tandem.sim.router import make_router
from tandem.sim.sequence import SimSeq
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import CostModel, TraceRequest
from tandem.sim.worker import Delivery, SimWorker

# ("route", t, RouteRequest, RouteDecision | None), ("kv", t, KVEventRecord, None),
# ("prefill_done", t, RouteDecision, prompt tokens), ("decode_done", t, RouteDecision, 0),
# ("refresh", t, ((WorkerInfo, WorkerLoad), ...), None),
# ("scale", t, (((WorkerInfo, WorkerLoad), ...), {role: replicas}), (ScaleDecision, ...))
LogEntry = tuple[str, float, Any, Any]

_ARRIVAL, _STEP_END, _TRANSFER, _REFRESH, _AUTOSCALE, _WORKER_UP = range(6)


@dataclass(frozen=True)
class ClusterConfig:
    """A cluster to simulate: pool sizes at the start, the workers' batcher limits and KV pool,
    the scheduler, and optionally the autoscaler (None: fixed pools)."""

    num_prefill: int
    num_decode: int
    step: StepModelConfig = field(default_factory=StepModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    autoscaler: AutoscalerConfig | None = None
    startup_s: float = 0.0  # a scaled-up worker takes requests this long after the decision
    vectorised_routing: bool = False  # router.VectorRouter (prefix_aware only), for large clusters
    slo: Slo | None = None
    # what the gateway spends on a request before it routes it (HTTP, tokenisation), counted in
    # its TTFT and e2e: a request arriving at t is routed at t + gateway_latency_s
    gateway_latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError(f"need >= 0 prefill and >= 1 decode workers, got {self.num_prefill}/{self.num_decode}")
        if not (self.startup_s >= 0 and self.gateway_latency_s >= 0):
            raise ValueError(
                f"startup_s and gateway_latency_s must be >= 0, got {self.startup_s}, {self.gateway_latency_s}"
            )
        if self.step.block_size != self.scheduler.block_size:
            raise ValueError(
                f"step block_size {self.step.block_size} != scheduler block_size {self.scheduler.block_size}"
            )


class ClusterSim:
    """One run over `trace` (sorted by arrival). Call `run()` once. `prefill_cost` prices the
    prefill workers' steps when they differ from the others (e.g. another tensor-parallel degree);
    `cost` prices every other step and the KV hand-offs."""

    def __init__(
        self,
        config: ClusterConfig,
        cost: CostModel,
        trace: Sequence[TraceRequest],
        record: bool = False,
        prefill_cost: CostModel | None = None,
    ) -> None:
        self.config, self.cost, self.trace = config, cost, trace
        self.records = Records(len(trace))
        self.pools = Pools(config.step, cost, prefill_cost)
        self.decisions: dict[int, RouteDecision] = {}
        self.scale_log: list[tuple[float, WorkerRole, int, int, str]] = []  # (t, role, from, to, reason)
        # With `record`: what the real scheduler and autoscaler saw and decided, in order (the
        # tests replay it through `Scheduler` and `Autoscaler`): see `LogEntry`.
        self.log: list[LogEntry] | None = [] if record else None
        self._heap: list[tuple[float, int, int, object]] = []
        self._order = 0
        self.router = make_router(config.scheduler, config.vectorised_routing)
        self._autoscale_state: PolicyState | None = None
        self._outstanding = 0
        self._next_arrival = 0
        self._pending_work = 0  # events in the heap that are not periodic ticks
        self._num_events = 0
        self._kv_bytes_per_token = cost.kv_bytes_per_token()
        self.counts = {RouteKind.DISAGGREGATED: 0, RouteKind.LOCAL_PREFILL: 0}

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> SimResult:
        for role, n in ((WorkerRole.PREFILL, self.config.num_prefill), (WorkerRole.DECODE, self.config.num_decode)):
            for _ in range(n):
                self.pools.add(role, 0.0)
        self._refresh(0.0)
        if self.trace:
            self._push(self.trace[0].arrival_s + self.config.gateway_latency_s, _ARRIVAL, 0)
            self._push(self.config.scheduler.refresh_interval_s, _REFRESH, None)
            if self.config.autoscaler is not None:
                self._push(self.config.autoscaler.interval_s, _AUTOSCALE, None)
        handlers = {
            _ARRIVAL: self._on_arrival,
            _STEP_END: self._on_step_end,
            _TRANSFER: self._on_transfer,
            _REFRESH: self._on_refresh,
            _AUTOSCALE: self._on_autoscale,
            _WORKER_UP: self._on_worker_up,
        }
        heap = self._heap
        now = 0.0
        while heap and self._pending_work:  # else only ticks are left: done, or stuck for good
            now, _, kind, payload = heapq.heappop(heap)
            self._num_events += 1
            if kind < _REFRESH or kind == _WORKER_UP:
                self._pending_work -= 1
            handlers[kind](now, payload)
        everyone = self.pools.everyone(now)
        return summarize(
            self.records, self.trace, everyone, self.counts, self.config.slo, now, len(self.scale_log), self._num_events
        )

    def _push(self, at_s: float, kind: int, payload: object) -> None:
        self._order += 1
        if kind < _REFRESH or kind == _WORKER_UP:
            self._pending_work += 1
        heapq.heappush(self._heap, (at_s, self._order, kind, payload))

    @property
    def _done(self) -> bool:
        return self._outstanding == 0 and self._next_arrival >= len(self.trace)

    # --- requests ------------------------------------------------------------------------------
    def _on_arrival(self, now: float, payload: object) -> None:
        rid = payload
        assert isinstance(rid, int)
        self._next_arrival = rid + 1
        if rid + 1 < len(self.trace):
            self._push(self.trace[rid + 1].arrival_s + self.config.gateway_latency_s, _ARRIVAL, rid + 1)
        req = self.trace[rid]
        self.records.arrival_s[rid] = req.arrival_s
        bs = self.config.scheduler.block_size
        route = RouteRequest(str(rid), req.prompt_tokens, prompt_block_hashes(rid, req, bs), rid)
        try:
            decision = self.router.route(route, now, req.prefix_group)
        except NoWorkerError:
            self.records.failed += 1
            if self.log is not None:
                self.log.append(("route", now, route, None))
            return
        if self.log is not None:
            self.log.append(("route", now, route, decision))
        self._outstanding += 1
        self.decisions[rid] = decision
        self.counts[decision.kind] += 1
        total = req.prompt_tokens + max(1, req.output_tokens)
        if decision.prefill is None:
            seq = SimSeq(rid, req.prompt_tokens, total, False, req.prefix_group, req.prefix_tokens)
            self._deliver(now, self.pools.workers[decision.decode.worker_id], Delivery(seq, False))
        else:
            seq = SimSeq(rid, req.prompt_tokens, req.prompt_tokens + 1, True, req.prefix_group, req.prefix_tokens)
            self.pools.workers[decision.decode.worker_id].expected += 1
            self._deliver(now, self.pools.workers[decision.prefill.worker_id], Delivery(seq, False))

    def _deliver(self, now: float, worker: SimWorker, delivery: Delivery) -> None:
        if worker.deliver(now, delivery):
            self._push(worker.end_s, _STEP_END, (worker, worker.version))
        elif not worker.busy:
            self._start(now, worker)

    def _start(self, now: float, worker: SimWorker) -> None:
        end_s = worker.start_step(now)
        if end_s is not None:
            self._push(end_s, _STEP_END, (worker, worker.version))
        elif worker.draining and worker.idle and worker.worker_id in self.pools.workers:
            self.pools.retire(now, worker)

    def _on_step_end(self, now: float, payload: object) -> None:
        worker, version = cast(tuple[SimWorker, int], payload)
        if version != worker.version:
            return  # replaced by a truncated run
        result = worker.finish_step()
        records = self.records
        for group, before, full in result.stored:
            worker.kv_event_seq += 1
            hashes = group_block_hashes(group, before, full)
            event = KVEventRecord(worker.worker_id, 1, worker.kv_event_seq, KVEventKind.STORED, hashes)
            self.router.stored(event, group)
            if self.log is not None:
                self.log.append(("kv", now, event, None))
        for seq in result.sampled:
            rid = seq.rid
            if records.first_token_s[rid] != records.first_token_s[rid]:  # NaN: the first token
                records.first_token_s[rid] = now
                decision = self.decisions[rid]
                self.router.prefill_done(decision, seq.num_prompt, now)
                if self.log is not None:
                    self.log.append(("prefill_done", now, decision, seq.num_prompt))
        for seq in result.finished:
            if seq.hand_off:
                self._hand_off(now, worker, seq)
            else:
                self._request_done(now, seq.rid, seq.num_tokens - seq.num_prompt)
        self._start(now, worker)

    def _hand_off(self, now: float, prefill: SimWorker, seq: SimSeq) -> None:
        rid = seq.rid
        req = self.trace[rid]
        if req.output_tokens <= 1:
            prefill.model.release(seq)
            decode = self.pools.workers[self.decisions[rid].decode.worker_id]
            decode.expected -= 1
            self._request_done(now, rid, 1)
            if decode.draining and decode.idle and decode.worker_id in self.pools.workers:
                self.pools.retire(now, decode)
            return
        decision = self.decisions[rid]
        nbytes = (req.prompt_tokens - decision.decode_cached_tokens) * self._kv_bytes_per_token
        self._push(now + self.cost.transfer_seconds(nbytes), _TRANSFER, (prefill, seq))

    def _on_transfer(self, now: float, payload: object) -> None:
        prefill, seq = cast(tuple[SimWorker, SimSeq], payload)
        prefill.model.release(seq)  # ReleaseKV: P's blocks come back
        if not prefill.busy:
            self._start(now, prefill)
        req = self.trace[seq.rid]
        decode = self.pools.workers[self.decisions[seq.rid].decode.worker_id]
        handoff = SimSeq(
            seq.rid,
            req.prompt_tokens,
            req.prompt_tokens + req.output_tokens,
            False,
            req.prefix_group,
            req.prefix_tokens,
        )
        handoff.num_tokens = req.prompt_tokens + 1  # the prompt and the first token
        decode.expected -= 1
        self._deliver(now, decode, Delivery(handoff, True))

    def _request_done(self, now: float, rid: int, num_output: int) -> None:
        self.records.finish_s[rid] = now
        self.records.output_tokens[rid] = num_output
        decision = self.decisions.pop(rid)
        self.router.decode_done(decision, now)
        if self.log is not None:
            self.log.append(("decode_done", now, decision, 0))
        self._outstanding -= 1

    # --- registry and scaling ------------------------------------------------------------------
    def _on_refresh(self, now: float, payload: object) -> None:
        self._refresh(now)
        if not self._done:
            self._push(now + self.config.scheduler.refresh_interval_s, _REFRESH, None)

    def _refresh(self, now: float) -> None:
        workers = self.pools.routable[WorkerRole.PREFILL] + self.pools.routable[WorkerRole.DECODE]
        seen = tuple((w.info, w.load(now)) for w in workers)
        self.router.refresh(now, seen)
        if self.log is not None:
            self.log.append(("refresh", now, seen, None))

    def _on_autoscale(self, now: float, payload: object) -> None:
        config = self.config.autoscaler
        assert config is not None
        pools = self.pools
        current = {role: pools.size(role) for role in WorkerRole}
        if self._autoscale_state is None:
            self._autoscale_state = PolicyState.seeded(current, now)
        loads = {role: pools.loads(role, now) for role in WorkerRole}
        signals = {role: pool_signals(role, loads[role], now, config.max_signal_age_s) for role in WorkerRole}
        decisions, self._autoscale_state = decide(config, signals, current, self._autoscale_state, now)
        if self.log is not None:
            workers = pools.routable[WorkerRole.PREFILL] + pools.routable[WorkerRole.DECODE]
            seen = tuple((w.info, w.load(now)) for w in workers)
            self.log.append(("scale", now, (seen, current), tuple(decisions)))
        for d in decisions:
            if d.desired > d.current:
                self.scale_log.append((now, d.role, d.current, d.desired, d.reason.value))
                for _ in range(d.desired - d.current):
                    worker = pools.add(d.role, now + self.config.startup_s)
                    if worker.up_since_s > 0.0:
                        self._push(worker.up_since_s, _WORKER_UP, worker)
            elif d.desired < d.current:
                self.scale_log.append((now, d.role, d.current, d.desired, d.reason.value))
                pools.shrink(d.role, d.current - d.desired, now)
                # A draining worker deregisters at once; the gateway would see that at its next
                # refresh and retry a refused request elsewhere. Here it sees it at once.
                self._refresh(now)
        if not self._done:
            self._push(now + config.interval_s, _AUTOSCALE, None)

    def _on_worker_up(self, now: float, payload: object) -> None:
        assert isinstance(payload, SimWorker)
        self.pools.mark_up(payload)
