"""The worker's KV event publisher: its block pool's changes, on their way to Redis.

Who calls what: the step-loop tick hands each step's block stored/removed/cleared events to
`put` (never blocks, so Redis is never on the step loop); this class's daemon thread appends
them to the cluster's `kv_events` stream in order, under the worker's epoch, where every
gateway's prefix index reads them. A Redis error is logged and that event is lost: the readers
see the seq gap and resync this worker. Without cluster state (no Redis) events are dropped.
"""

from __future__ import annotations

import logging
import queue
import threading

import redis

from tandem.common.cluster_state import ClusterState
from tandem.engine.block_pool import KVEvent

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2  # how often the thread checks for stop() while idle


class KVEventPublisher:
    """One per worker process. `epoch` (e.g. `time.time_ns()` at start) makes the worker's
    `(epoch, seq)` pairs unique across restarts."""

    def __init__(self, state: ClusterState | None, worker_id: str, epoch: int) -> None:
        self._state, self._worker_id, self._epoch = state, worker_id, epoch
        self._queue: queue.SimpleQueue[list[KVEvent]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)

    def put(self, events: list[KVEvent]) -> None:
        """Loop thread: queue one step's events for publishing."""
        self._queue.put(events)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """End the thread (bounded join); events still queued are dropped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._queue.get(timeout=POLL_INTERVAL_S)
            except queue.Empty:
                continue
            if self._state is None:
                continue
            for event in batch:
                try:
                    self._state.append_kv_events(self._worker_id, self._epoch, event.kind, event.block_hashes)
                except (redis.RedisError, ValueError):
                    log.exception("publishing KV event failed")
