"""Overload control at the gateway: admit a request only if the pools can start it within its
TTFT budget; refuse the rest at once (issue 15, deliverable 2).

Lifecycle of one request (`serving.serve_generation`, after authentication, preparation and
the rate limits):
1. `AdmissionController.admit(key_id, priority, num_prompt_tokens)` reads the
   signals (`AdmissionSignals`): this gateway's own in-flight counts, the pools' published
   load (waiting requests, queued prefill tokens, as last read from Redis), and the measured
   drain rates (`throughput.py`), and the adaptive limit. `decide` turns them into an `Admission`.
2. Refused: an `OpenAIError` at once, never a queue: 429 when the API key is over its own
   bound (`max_inflight_per_key`), 503 when the cluster is; both with `Retry-After` computed
   from the measured drain rate (the time for the excess to drain), in [1, 60] s.
3. Admitted: an `AdmissionTicket`. The caller calls `started(queue_s)` at the first token (with
   the request's wait in a worker's queue, where the worker reported it) and `finished()`
   when the response ends (any way; both idempotent), which keep the counts and the drain
   rates exact.

The bounds and priorities: admission_policy.py (`decide`, pure). The adaptive limit:
concurrency_limit.py; this controller feeds it one sample per admitted request, its TTFT and
queue wait at its first token, or at the first admission that finds it still waiting past the
target (its wait so far, queue wait unknown).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tandem.gateway.admission_policy import AdmissionConfig, AdmissionSignals, decide
from tandem.gateway.concurrency_limit import ConcurrencyLimit
from tandem.gateway.errors import rate_limited, service_unavailable
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.throughput import Throughput

__all__ = ["AdmissionConfig", "AdmissionController", "AdmissionTicket", "PoolLoad"]


@dataclass(frozen=True)
class PoolLoad:
    """The pools' published load, summed over live workers (as last read from Redis)."""

    waiting: int = 0
    queued_prefill_tokens: int = 0


class AdmissionTicket:
    """One admitted request's place in the counts. `started(queue_s)` at its first token and
    `finished()` when it ends (any way); each acts once. `admitted_s` (the controller's clock)
    and `inflight` (the in-flight count just after its admission) make its limit sample, with
    its TTFT and `queue_s` (its wait in a worker's queue before a batch took it; None: not
    reported)."""

    def __init__(
        self, controller: AdmissionController, key_id: str, num_prompt_tokens: int, admitted_s: float, inflight: int
    ) -> None:
        self._controller = controller
        self.key_id = key_id
        self.num_prompt_tokens = num_prompt_tokens
        self.admitted_s = admitted_s
        self.inflight = inflight
        self.is_started = False
        self.is_finished = False

    def started(self, queue_s: float | None = None) -> None:
        if not self.is_started and not self.is_finished:
            self.is_started = True
            self._controller._started(self, queue_s)

    def finished(self) -> None:
        if not self.is_finished:
            self.is_finished = True
            self._controller._finished(self)


class AdmissionController:
    """Owned by `GatewayState`; used on the event loop only. `pool_load` returns the pools'
    published load (cheap: called once per request); `clock` (seconds) times the TTFT samples
    of the adaptive limit and the drain rates."""

    def __init__(
        self,
        config: AdmissionConfig,
        metrics: GatewayMetrics,
        pool_load: Callable[[], PoolLoad],
        throughput: Throughput | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._pool_load = pool_load
        self._clock = clock
        self._key_priority: Mapping[str, int] = config.key_priorities()
        self.throughput = throughput or Throughput(config.drain_window_s, clock)
        self.limit = ConcurrencyLimit(config.limit, config.ttft_target_s()) if config.limit.adaptive else None
        self.inflight = 0
        self.waiting = 0
        self.waiting_tokens = 0
        self._per_key: dict[str, int] = {}
        # Admitted, no first token and no sample yet, oldest first (an ordered set).
        self._unsampled: dict[AdmissionTicket, None] = {}
        metrics.set_admission_limit(0 if self.limit is None else self.limit.limit)

    def priority(self, key_id: str, requested: int | None) -> int:
        """The request's own priority, else its key's default, else 0."""
        return requested if requested is not None else self._key_priority.get(key_id, 0)

    def admit(self, key_id: str, priority: int, num_prompt_tokens: int) -> AdmissionTicket:
        """An admitted request's ticket, or the refusal as an `OpenAIError` (429 or 503)."""
        now = self._clock()
        self._sample_overdue(now)
        decision = decide(self.signals(key_id), priority, num_prompt_tokens, self.config)
        if not decision.admitted:
            self.metrics.admission_refused(decision.reason)
            if decision.status == 429:
                raise rate_limited(decision.message, decision.retry_after_s)
            raise service_unavailable(decision.message, decision.retry_after_s)
        self.inflight += 1
        self.waiting += 1
        self.waiting_tokens += num_prompt_tokens
        self.throughput.counts(self.waiting, self.inflight)
        self._per_key[key_id] = self._per_key.get(key_id, 0) + 1
        self.metrics.set_admitted(self.inflight)
        ticket = AdmissionTicket(self, key_id, num_prompt_tokens, now, self.inflight)
        self._unsampled[ticket] = None
        return ticket

    def signals(self, key_id: str) -> AdmissionSignals:
        load = self._pool_load()
        t = self.throughput
        return AdmissionSignals(
            self.inflight,
            self.waiting,
            self.waiting_tokens,
            self._per_key.get(key_id, 0),
            load.waiting,
            load.queued_prefill_tokens,
            t.starts.rate(),
            t.start_tokens.rate(),
            t.finishes.rate(),
            None if self.limit is None else self.limit.limit,
        )

    def _sample_overdue(self, now: float) -> None:
        """Requests still waiting past the target are late samples now, oldest first, their
        whole wait so far counted as queue wait (they wait in some queue: below the knee, a
        request's own prefill is well within the target)."""
        if self.limit is None:
            return
        while self._unsampled:
            ticket = next(iter(self._unsampled))
            if now - ticket.admitted_s <= self.limit.target_s:
                return
            self._observe(ticket, now, now - ticket.admitted_s)

    def _observe(self, ticket: AdmissionTicket, now: float, queue_s: float | None = None) -> None:
        del self._unsampled[ticket]
        if self.limit is not None:
            limit = self.limit.observe(ticket.admitted_s, now - ticket.admitted_s, ticket.inflight, queue_s)
            self.metrics.set_admission_limit(limit)

    def _started(self, ticket: AdmissionTicket, queue_s: float | None) -> None:
        self.waiting -= 1
        self.waiting_tokens -= ticket.num_prompt_tokens
        self.throughput.started(ticket.num_prompt_tokens)
        self.throughput.counts(self.waiting, self.inflight)
        if ticket in self._unsampled:
            # a worker's figure: a nonsensical one is not known, never fatal
            known = queue_s is not None and math.isfinite(queue_s) and queue_s >= 0
            self._observe(ticket, self._clock(), queue_s if known else None)

    def _finished(self, ticket: AdmissionTicket) -> None:
        if not ticket.is_started:  # ended before its first token
            self.waiting -= 1
            self.waiting_tokens -= ticket.num_prompt_tokens
            self._unsampled.pop(ticket, None)
        else:
            self.throughput.finished()
        self.inflight -= 1
        self.throughput.counts(self.waiting, self.inflight)
        left = self._per_key[ticket.key_id] - 1
        if left:
            self._per_key[ticket.key_id] = left
        else:
            del self._per_key[ticket.key_id]
        self.metrics.set_admitted(self.inflight)
