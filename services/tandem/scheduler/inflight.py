"""Work this gateway has routed that the workers' published load may not show yet.

A worker publishes its load once per heartbeat tick (a third of its TTL), so between two ticks
every route would see the same numbers: a burst of requests would all go to the worker that
looked best, and a load snapshot taken while one of our own prefills was running would keep
counting it after it finished. Dynamo's and llm-d's routers track their own in-flight work for
the same reason. This table adds, per worker:

- `tokens`: uncached prompt tokens routed to it for prefill and not yet prefilled (P, or D when
  local): the prompt minus the leading blocks the index said it holds;
- `prompt_tokens`: the same prompts at their full length;
- `streams`: decode streams routed to it that have not ended;
- `last_done_s`: when one of our requests last finished a stage there.

and `adjust(load)` gives the load the policies see:
`queued_prefill_tokens = tokens + max(0, published queue - prompt_tokens)` (the published queue
counts 0 when published before last_done_s) and `running = max(published running, streams)`.
Why the subtraction: a worker reports a WAITING prompt at its full length (its prefix hit is
taken at admission, worker/load.py), so our own waiting prompts are in the published queue at
full length; counted there, a worker that holds a hot prefix looks loaded by hits it has not
taken yet, and routing pushes that prefix's requests away to workers that miss (measured: the
prefix-aware hit rate fell to 0.66 of the oracle at 2.6x load in `routing_zipf`). So our own
prompts count at their uncached length (`tokens`), and the published queue only for what
exceeds them (other gateways' work). When some of ours already run (reported at their
uncached remainder), the subtraction takes too much and other gateways' work is
underestimated by at most their cached part. A snapshot older than our last completion on
that worker may still count work that is gone, so its queue is dropped until the next tick.
Clocks: `last_done_s` and the load's `timestamp_s` are both wall clock (same host in a local
cluster; NTP-close otherwise).

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
        self._prompt_tokens: dict[str, int] = {}
        self._streams: dict[str, int] = {}
        self._last_done_s: dict[str, float] = {}

    def begin(self, prefill_worker: str, num_tokens: int, decode_worker: str, num_prompt_tokens: int) -> None:
        """A request was routed: a prompt of `num_prompt_tokens` tokens, `num_tokens` of them
        uncached, to prefill on `prefill_worker` (P, or D when local), and one decode stream on
        `decode_worker`."""
        with self._lock:
            self._tokens[prefill_worker] = self._tokens.get(prefill_worker, 0) + num_tokens
            self._prompt_tokens[prefill_worker] = self._prompt_tokens.get(prefill_worker, 0) + num_prompt_tokens
            self._streams[decode_worker] = self._streams.get(decode_worker, 0) + 1

    def prefill_done(self, worker_id: str, num_tokens: int, now_s: float, num_prompt_tokens: int) -> None:
        """The prompt of a `begin` ran (or failed): the same `num_tokens` and `num_prompt_tokens`."""
        with self._lock:
            _take(self._tokens, worker_id, num_tokens)
            _take(self._prompt_tokens, worker_id, num_prompt_tokens)
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
            return (
                frozenset(self._tokens)
                | frozenset(self._prompt_tokens)
                | frozenset(self._streams)
                | frozenset(self._last_done_s)
            )

    def adjust(self, worker_id: str, load: WorkerLoad | None) -> WorkerLoad | None:
        """The load the policies should see for `worker_id` (see the module docstring)."""
        with self._lock:
            tokens = self._tokens.get(worker_id, 0)
            prompt_tokens = self._prompt_tokens.get(worker_id, 0)
            streams = self._streams.get(worker_id, 0)
            last_done_s = self._last_done_s.get(worker_id)
        if load is None:
            if not tokens and not streams:
                return None
            return WorkerLoad(0, streams, tokens, 0, 0, 0.0)
        published = load.queued_prefill_tokens
        if last_done_s is not None and load.timestamp_s <= last_done_s:
            published = 0
        others = published - prompt_tokens if published > prompt_tokens else 0
        return replace(load, queued_prefill_tokens=tokens + others, running=max(load.running, streams))

    def forget(self, worker_id: str) -> None:
        with self._lock:
            self._tokens.pop(worker_id, None)
            self._prompt_tokens.pop(worker_id, None)
            self._streams.pop(worker_id, None)
            self._last_done_s.pop(worker_id, None)


def _take(counts: dict[str, int], worker_id: str, num: int) -> None:
    """`counts[worker_id] -= num`, dropping the entry at 0 or below."""
    left = counts.get(worker_id, 0) - num
    if left > 0:
        counts[worker_id] = left
    else:
        counts.pop(worker_id, None)
