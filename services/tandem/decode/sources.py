"""The decode worker's view of the registered prefill workers: which KV sources it may dial.

A decode worker dials only the `source_address` of a registered, live prefill worker with
its own layout fingerprint, model id and block-hash version (decode/handle_check.py). The
registry is the cluster state in Redis (`ClusterState.get_worker`: the `worker:{id}` key,
which expires when the worker stops heartbeating and is deleted when it drains).

Redis stays off the per-token path: it is read at most once per request that comes with a
handle, in a thread (the asyncio loop never blocks on it), bounded by the client's timeouts.
Answers are cached per worker id for `cache_ttl_s`; concurrent requests naming the same
worker share one read. If Redis does not answer, an entry confirmed within `stale_grace_s`
(the heartbeat TTL: the key was alive then) is still used, and Redis is not asked again for
`cache_ttl_s`, so an outage costs at most one bounded wait per `cache_ttl_s`; without such an
entry the handle is rejected (REGISTRY_UNAVAILABLE) and the prompt is recomputed locally.

Asyncio thread only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from tandem.common.block_hash import BLOCK_HASH_VERSION
from tandem.common.kv_handle import KVHandle
from tandem.common.workers import WorkerInfo
from tandem.decode.handle_check import Compatibility, HandleRejectedError, HandleVerifier, RejectReason, check_source
from tandem.worker.worker import Worker

log = logging.getLogger(__name__)

DEFAULT_CACHE_TTL_S = 1.0


@dataclass(frozen=True)
class _Entry:
    info: WorkerInfo
    confirmed_s: float  # clock() when Redis last listed it


class SourceRegistry:
    """Checks a handle's source against the registry (`check`), reading it through `lookup`.

    `lookup(worker_id)` runs in a thread and returns the live worker's registration, None if
    there is none, or raises `redis.RedisError`/`OSError` (ClusterState.get_worker). `expected`:
    what a source must share with this worker. `clock`: monotonic seconds.
    """

    def __init__(
        self,
        lookup: Callable[[str], WorkerInfo | None],
        expected: Compatibility,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        stale_grace_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < cache_ttl_s <= stale_grace_s:
            raise ValueError(f"need 0 < cache_ttl_s <= stale_grace_s, got {cache_ttl_s} and {stale_grace_s}")
        self._lookup, self._expected = lookup, expected
        self._ttl_s, self._grace_s, self._clock = cache_ttl_s, stale_grace_s, clock
        self._cache: dict[str, _Entry] = {}
        self._reads: dict[str, asyncio.Task[WorkerInfo | None]] = {}  # one read per worker id at a time
        self._failed_s: float | None = None  # clock() of the last failed read
        self.num_reads = 0  # reads of Redis (for tests: at most one per request, shared, cached)

    async def check(self, handle: KVHandle) -> None:
        """Raise HandleRejectedError unless the handle's source is a live, compatible prefill
        worker at the address it names (`handle_check.check_source`)."""
        check_source(handle, await self._info(handle.source_worker_id, handle.source_address), self._expected)

    async def _info(self, worker_id: str, address: str) -> WorkerInfo | None:
        now = self._clock()
        entry = self._cache.get(worker_id)
        if entry is not None and now - entry.confirmed_s <= self._ttl_s and entry.info.address == address:
            return entry.info
        if self._failed_s is not None and now - self._failed_s <= self._ttl_s:
            return self._stale(worker_id, now, f"Redis did not answer {now - self._failed_s:.1f} s ago")
        try:
            info = await asyncio.shield(self._read(worker_id))
        except (redis.RedisError, OSError) as exc:
            self._failed_s = self._clock()
            return self._stale(worker_id, self._clock(), str(exc))
        self._failed_s = None
        now = self._clock()
        if info is None:
            self._cache.pop(worker_id, None)
        else:
            self._cache = {w: e for w, e in self._cache.items() if now - e.confirmed_s <= self._grace_s}
            self._cache[worker_id] = _Entry(info, now)
        return info

    def _read(self, worker_id: str) -> asyncio.Task[WorkerInfo | None]:
        task = self._reads.get(worker_id)
        if task is None:
            self.num_reads += 1
            task = asyncio.ensure_future(asyncio.to_thread(self._lookup, worker_id))
            self._reads[worker_id] = task
            task.add_done_callback(lambda _: self._reads.pop(worker_id, None))
        return task

    def _stale(self, worker_id: str, now: float, why: str) -> WorkerInfo:
        """The cached entry if it was confirmed within the grace, else REGISTRY_UNAVAILABLE."""
        entry = self._cache.get(worker_id)
        if entry is not None and now - entry.confirmed_s <= self._grace_s:
            return entry.info
        raise HandleRejectedError(
            RejectReason.REGISTRY_UNAVAILABLE,
            f"cannot confirm worker {worker_id!r} in the registry ({why}), and no recent confirmation is cached",
        )


def handle_verifier(worker: Worker) -> HandleVerifier:
    """The decode servicer's verifier: this worker's block size and model id, and a registry
    view over its cluster state (none without Redis), with the heartbeat TTL as the grace."""
    state = worker.cluster_state
    sources = (
        SourceRegistry(
            state.get_worker,
            Compatibility(worker.layout.fingerprint, worker.engine.model_id, BLOCK_HASH_VERSION),
            stale_grace_s=worker.config.heartbeat_ttl_s,
        )
        if state is not None
        else None
    )
    return HandleVerifier(
        worker.layout.block_size, worker.engine.model_id, sources, worker.metrics, worker.config.worker_id
    )
