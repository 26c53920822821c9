"""The worker's KV event publisher: its block pool's changes, on their way to Redis.

Who calls what: the step-loop tick calls `collect(pool)` after each step (it never blocks, so
Redis is never on the step loop); this class's daemon thread appends the events to the
cluster's `kv_events` stream in order, under the worker's epoch, where every gateway's prefix
index reads them. Without cluster state (no Redis) events are dropped. The thread takes the
step batches queued behind the one it takes, and publishes each run of adjacent STORED (or
REMOVED) events as one event (`coalesce`): the pool records one event per block, so a prefill
step of 32 prompts would otherwise be over a hundred XADDs, on the worker's own core.

Nothing grows without bound, and nothing lost stays lost:
1. The hand-off queue holds at most `max_pending` step batches. A batch that does not fit is
   dropped (counted) and a resync is requested.
2. A failed XADD begins an outage: one log line (`tandem.common.outage`), then every batch is
   dropped (counted) without calling Redis, except for a PING at most every `probe_interval_s`
   (also while idle). When Redis answers again, batches are still dropped and a resync is
   requested, until the resync is published. So an outage costs no traceback and no wait per
   event, and no event of the old epoch is published after it.
3. A resync (also requested by the heartbeat when the worker's registration was gone: Redis
   may have restarted empty) is taken by the next `collect` on the loop thread, where the pool
   is consistent: the pool's pending events are discarded, its whole set of cached block hashes
   is queued, and everything queued before it is discarded (the set supersedes it). The thread
   publishes it under a new, larger epoch: CLEARED first, then STORED in chunks of
   `RESYNC_CHUNK_BLOCKS`. Every gateway's index drops the worker's old entries on the new epoch
   (scheduler/index.py) and rebuilds them from the set. If that publish fails, the next resync
   follows the outage.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis

from tandem.common.cluster_state import ClusterState
from tandem.common.outage import Outage
from tandem.common.workers import KVEventKind
from tandem.engine.block_pool import KVEvent

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2  # how often the thread checks for stop() while idle
DEFAULT_MAX_PENDING = 1024  # step batches queued for the publisher thread
DEFAULT_PROBE_INTERVAL_S = 0.5
RESYNC_CHUNK_BLOCKS = 4096  # block hashes per STORED entry of a resync (32 KiB)


class CachedBlocks(Protocol):
    """What `collect` reads of the block pool (`tandem.engine.block_pool.BlockPool`)."""

    def take_events(self) -> list[KVEvent]: ...

    def cached_hashes(self) -> set[int]: ...


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _NoCounter:
    def inc(self, amount: float = 1) -> None:
        pass


@dataclass(frozen=True)
class _Resync:
    """The pool's whole set of cached block hashes, taken on the loop thread."""

    block_hashes: frozenset[int]


class KVEventPublisher:
    """One per worker process. `epoch` (e.g. `time.time_ns()` at start) makes the worker's
    `(epoch, seq)` pairs unique across restarts; a resync moves to a larger one. `dropped`
    counts the events dropped (full queue, outage), `resyncs` the resyncs published."""

    def __init__(
        self,
        state: ClusterState | None,
        worker_id: str,
        epoch: int,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        dropped: Counter | None = None,
        resyncs: Counter | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._state, self._worker_id, self._epoch = state, worker_id, epoch
        self._queue: queue.Queue[list[KVEvent] | _Resync] = queue.Queue(maxsize=max_pending)
        self._resync_wanted = threading.Event()
        self._dropped = dropped or _NoCounter()
        self._resyncs = resyncs or _NoCounter()
        self._outage = Outage(f"KV events of {worker_id}", log)
        self._next_probe_s = 0.0
        self._awaiting_resync = False  # events were lost: drop batches until a resync is out
        self.probe_interval_s = DEFAULT_PROBE_INTERVAL_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)

    @property
    def epoch(self) -> int:
        """The epoch of the events published now (publisher thread; read for tests)."""
        return self._epoch

    # ---- loop thread ----------------------------------------------------------------------
    def collect(self, pool: CachedBlocks) -> None:
        """Loop thread, after each step: queue the pool's new events, or its whole block set
        if a resync was requested. Never blocks."""
        events = pool.take_events()
        if self._resync_wanted.is_set():
            self._resync_wanted.clear()
            resync = _Resync(frozenset(pool.cached_hashes()))
            while True:  # what is queued is superseded by the set: make room for it
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put_nowait(resync)  # the only producer: the queue is empty now
        elif events:
            self.put(events)

    def put(self, events: list[KVEvent]) -> None:
        """Loop thread: queue one step's events; if the queue is full they are dropped and a
        resync is requested."""
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            self._dropped.inc(len(events))
            self.request_resync()

    # ---- any thread -----------------------------------------------------------------------
    def request_resync(self) -> None:
        """Ask for the whole block set to be republished under a new epoch (see module doc)."""
        self._resync_wanted.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """End the thread (bounded join); events still queued are dropped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- publisher thread -----------------------------------------------------------------
    def _run(self) -> None:
        taken: _Resync | None = None  # a resync met while merging batches: published next
        while not self._stop.is_set():
            item: list[KVEvent] | _Resync
            if taken is not None:
                item, taken = taken, None
            else:
                try:
                    item = self._queue.get(timeout=POLL_INTERVAL_S)
                except queue.Empty:
                    if self._state is not None and self._outage.down and self._probe(self._state):
                        self.request_resync()  # idle: notice the end of the outage all the same
                    continue
            if isinstance(item, list):
                item, taken = self._with_queued(item)
            if self._state is not None:
                self._publish(self._state, item)

    def _with_queued(self, batch: list[KVEvent]) -> tuple[list[KVEvent], _Resync | None]:
        """`batch` and the step batches queued behind it, as one batch (what piled up during
        the last XADD goes out together), and the resync that ended them, if one did."""
        merged = list(batch)
        while True:
            try:
                following = self._queue.get_nowait()
            except queue.Empty:
                return merged, None
            if isinstance(following, _Resync):
                return merged, following
            merged.extend(following)

    def _publish(self, state: ClusterState, item: list[KVEvent] | _Resync) -> None:
        """Publish one item; during an outage, and after it until a resync is published, a
        batch of events is dropped (the resync supersedes it)."""
        if self._outage.down and not self._probe(state):
            self._dropped.inc(_num_events(item))
            return
        if not isinstance(item, _Resync) and self._awaiting_resync:
            self._dropped.inc(len(item))
            self.request_resync()
            return
        try:
            if isinstance(item, _Resync):
                self._publish_resync(state, item)
                self._awaiting_resync = False
            else:
                left = len(item)  # events not published yet
                for kind, block_hashes, num_events in coalesce(item):
                    try:
                        state.append_kv_events(self._worker_id, self._epoch, kind, block_hashes)
                    except (redis.RedisError, OSError):
                        self._dropped.inc(left)
                        raise
                    left -= num_events
        except (redis.RedisError, OSError) as exc:
            self._awaiting_resync = True
            if self._outage.failed(exc, "dropping KV events until it answers, then republishing the block set"):
                self._next_probe_s = time.monotonic() + self.probe_interval_s
            return
        self._outage.ok()

    def _probe(self, state: ClusterState) -> bool:
        """During an outage, at most every `probe_interval_s`: True once Redis answers a PING
        (the outage is over)."""
        now_s = time.monotonic()
        if now_s < self._next_probe_s:
            return False
        self._next_probe_s = now_s + self.probe_interval_s
        try:
            state.ping()
        except (redis.RedisError, OSError):
            return False
        self._outage.ok()
        return True

    def _publish_resync(self, state: ClusterState, resync: _Resync) -> None:
        self._epoch = max(time.time_ns(), self._epoch + 1)
        hashes = sorted(resync.block_hashes)
        state.append_kv_events(self._worker_id, self._epoch, KVEventKind.CLEARED, ())
        for start in range(0, len(hashes), RESYNC_CHUNK_BLOCKS):
            chunk = hashes[start : start + RESYNC_CHUNK_BLOCKS]
            state.append_kv_events(self._worker_id, self._epoch, KVEventKind.STORED, chunk)
        self._resyncs.inc()
        log.info("republished the %d cached block(s) of %s under epoch %d", len(hashes), self._worker_id, self._epoch)


def coalesce(events: list[KVEvent]) -> list[tuple[KVEventKind, tuple[int, ...], int]]:
    """The events as fewer, equivalent ones: each run of adjacent STORED (or REMOVED) events
    becomes one event with their hashes in order, up to `RESYNC_CHUNK_BLOCKS` hashes (readers
    apply an event's hashes as a set, in stream order, so the index ends up the same). A
    CLEARED event stays on its own. Each is `(kind, block_hashes, number of events merged)`.
    A prefill step stores one block per `block_size` prompt tokens: one XADD, not hundreds."""
    merged: list[tuple[KVEventKind, tuple[int, ...], int]] = []
    kind: KVEventKind | None = None
    hashes: list[int] = []
    count = 0
    for event in events:
        joins = event.kind is kind and kind is not KVEventKind.CLEARED
        if not joins or len(hashes) + len(event.block_hashes) > RESYNC_CHUNK_BLOCKS:
            if kind is not None:
                merged.append((kind, tuple(hashes), count))
            kind, hashes, count = event.kind, [], 0
        hashes.extend(event.block_hashes)
        count += 1
    if kind is not None:
        merged.append((kind, tuple(hashes), count))
    return merged


def _num_events(item: list[KVEvent] | _Resync) -> int:
    return len(item) if isinstance(item, list) else 0
