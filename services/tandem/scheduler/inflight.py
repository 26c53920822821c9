"""Work this gateway has routed that the workers' published load may not show yet.

A worker publishes its load once per heartbeat tick (a third of its TTL), so between two ticks
every route would see the same numbers: a burst of requests would all go to the worker that
looked best, and a load snapshot taken while one of our own prefills was running would keep
counting it after it finished. Dynamo's and llm-d's routers track their own in-flight work for
the same reason. This table adds, per worker:

- `tokens`: prompt tokens routed to it for prefill and not yet prefilled (P, or D when local);
- `streams`: decode streams routed to it that have not ended;
- `last_done_s`: when one of our requests last finished a stage there.

and `adjust(load)` gives the load the policies see:
`queued_prefill_tokens = tokens + (published queue, unless published before last_done_s)` and
`running = max(published running, streams)`. Published values include other gateways' work;
a snapshot older than our last completion on that worker may still count work that is gone,
so its queue is dropped until the next tick. Clocks: `last_done_s` and the load's
`timestamp_s` are both wall clock (same host in a local cluster; NTP-close otherwise).

Callers: `Scheduler.route` (`begin`) and the gateway pipeline, through `Scheduler.prefill_done`
and `Scheduler.decode_done`, exactly once per stage of each decision. Thread-safe (one lock).
"""

from __future__ import annotations

import threading
from dataclasses import replace

from tandem.common.workers import WorkerLoad


class InflightTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, int] = {}
        self._streams: dict[str, int] = {}
        self._last_done_s: dict[str, float] = {}

    def begin(self, prefill_worker: str, num_tokens: int, decode_worker: str) -> None:
        """A request was routed: `num_tokens` to prefill on `prefill_worker` (P, or D when
        local) and one decode stream on `decode_worker`."""
        with self._lock:
            self._tokens[prefill_worker] = self._tokens.get(prefill_worker, 0) + num_tokens
            self._streams[decode_worker] = self._streams.get(decode_worker, 0) + 1

    def prefill_done(self, worker_id: str, num_tokens: int, now_s: float) -> None:
        with self._lock:
            left = self._tokens.get(worker_id, 0) - num_tokens
            if left > 0:
                self._tokens[worker_id] = left
            else:
                self._tokens.pop(worker_id, None)
            self._last_done_s[worker_id] = now_s

    def decode_done(self, worker_id: str, now_s: float) -> None:
        with self._lock:
            left = self._streams.get(worker_id, 0) - 1
            if left > 0:
                self._streams[worker_id] = left
            else:
                self._streams.pop(worker_id, None)
            self._last_done_s[worker_id] = now_s

    def touched(self) -> frozenset[str]:
        """Workers whose load `adjust` may change."""
        with self._lock:
            return frozenset(self._tokens) | frozenset(self._streams) | frozenset(self._last_done_s)

    def adjust(self, worker_id: str, load: WorkerLoad | None) -> WorkerLoad | None:
        """The load the policies should see for `worker_id` (see the module docstring)."""
        with self._lock:
            tokens = self._tokens.get(worker_id, 0)
            streams = self._streams.get(worker_id, 0)
            last_done_s = self._last_done_s.get(worker_id)
        if load is None:
            if not tokens and not streams:
                return None
            return WorkerLoad(0, streams, tokens, 0, 0, 0.0)
        published = load.queued_prefill_tokens
        if last_done_s is not None and load.timestamp_s <= last_done_s:
            published = 0
        return replace(load, queued_prefill_tokens=tokens + published, running=max(load.running, streams))

    def forget(self, worker_id: str) -> None:
        with self._lock:
            self._tokens.pop(worker_id, None)
            self._streams.pop(worker_id, None)
            self._last_done_s.pop(worker_id, None)
