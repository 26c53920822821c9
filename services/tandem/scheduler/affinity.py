"""Session affinity: a conversation's requests go back to the decode worker that served it.

Who does what, per request that carries a session key (the gateway's `--session-key`):
1. The gateway hashes the key (`session_hash`; the raw key never leaves the gateway) and asks
   the `AffinityStore` which decode worker served the session last (one Redis GET of
   `tandem:{cluster}:session:{hash}`, bounded by a timeout; an error or a timeout is a miss).
2. It routes with that worker in `RouteRequest.session_worker`. `AffinityPolicy` wraps the
   configured policy: in the decode pool it returns the session's worker when that worker is
   a candidate (live, not excluded, not draining: a draining worker has left the registry) and
   within the affinity limits (`within_limits`); otherwise the wrapped policy decides as for
   any request. The prefill pool is always left to the wrapped policy (the decode worker holds
   the whole conversation, generated tokens included; the prefix index finds the prompt on P).
3. The gateway writes the decode worker it routed to (`remember`: SET with the TTL as the
   key's expiry, PX), off the request's path. So the affinity follows a move and lives
   `affinity_ttl_s` after the session's last request, and every gateway of the cluster
   reads the same value.
The decision stays a pure function of (request, views): the Redis access is at the edges.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections.abc import Sequence

import redis
import redis.asyncio as aioredis

from tandem.common.outage import Outage
from tandem.common.workers import WorkerRole
from tandem.scheduler.policies import Policy, PolicyConfig
from tandem.scheduler.types import RouteRequest, WorkerView

log = logging.getLogger(__name__)
SESSION_HASH_PERSON = b"tandem-session"


def session_hash(key: str) -> str:
    """The session key's stable 128-bit hash, hex (what Redis and the logs see instead of it)."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16, person=SESSION_HASH_PERSON).hexdigest()


class Affinity(str, enum.Enum):
    """How the session's worker fared in one decode pick."""

    NONE = "none"  # the request has no session worker
    KEPT = "kept"  # the session's worker was picked
    OVERLOADED = "overloaded"  # it was over the limits: the wrapped policy picked
    GONE = "gone"  # it is not a candidate (expired, drained, excluded): the wrapped policy picked


def within_limits(view: WorkerView, max_waiting: int, max_kv_usage: float) -> bool:
    """True when the worker may take the session's request: at most `max_waiting` requests
    waiting and its KV cache at most `max_kv_usage` full (no load published: idle)."""
    load = view.load
    if load is None:
        return True
    usage = load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0.0
    return load.waiting <= max_waiting and usage <= max_kv_usage


def affine_view(
    request: RouteRequest, candidates: Sequence[WorkerView], max_waiting: int, max_kv_usage: float
) -> tuple[WorkerView | None, Affinity]:
    """The session's worker among `candidates` if it may take the request, and why (pure)."""
    worker_id = request.session_worker
    if worker_id is None:
        return None, Affinity.NONE
    for view in candidates:
        if view.info.worker_id == worker_id:
            if within_limits(view, max_waiting, max_kv_usage):
                return view, Affinity.KEPT
            return None, Affinity.OVERLOADED
    return None, Affinity.GONE


class AffinityPolicy:
    """`inner` with session affinity in the decode pool (see the module docstring). Pure."""

    def __init__(self, inner: Policy, max_waiting: int, max_kv_usage: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_waiting = max_waiting
        self.max_kv_usage = max_kv_usage

    def pick(
        self,
        request: RouteRequest,
        candidates: Sequence[WorkerView],
        pool: WorkerRole,
        config: PolicyConfig,
    ) -> WorkerView:
        if pool is WorkerRole.DECODE and request.session_worker is not None:
            view, _ = affine_view(request, candidates, self.max_waiting, self.max_kv_usage)
            if view is not None:
                return view
        return self.inner.pick(request, candidates, pool, config)


class AffinityStore:
    """Session hash -> decode worker id in Redis, with `ttl_s` as the key's expiry.

    Owned by the gateway; called on its asyncio loop. Every call is bounded by `timeout_s`;
    a Redis error or a timeout is logged once per outage (`Outage`) and answered as a miss
    (`worker_of` returns None, `remember` does nothing): routing never waits on Redis longer.
    """

    def __init__(self, client: aioredis.Redis, cluster: str, ttl_s: float, timeout_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._redis = client
        self._prefix = f"tandem:{cluster}:session:"
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._timeout_s = timeout_s
        self._outage = Outage("session affinity", log)

    def key(self, session: str) -> str:
        return self._prefix + session

    async def worker_of(self, session: str) -> str | None:
        """The decode worker that served `session` last, if its affinity has not expired."""
        try:
            value = await asyncio.wait_for(self._redis.get(self.key(session)), self._timeout_s)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            self._outage.failed(exc, "routing without session affinity")
            return None
        self._outage.ok()
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def remember(self, session: str, worker_id: str) -> None:
        """`worker_id` served `session`: its affinity lasts `ttl_s` from now."""
        try:
            await asyncio.wait_for(self._redis.set(self.key(session), worker_id, px=self._ttl_ms), self._timeout_s)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as exc:
            self._outage.failed(exc, "the session's affinity is not recorded")
            return
        self._outage.ok()
