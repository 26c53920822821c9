"""Session affinity shared by two gateways' schedulers through one real redis-server: what one
gateway routes, the other follows; an overloaded worker moves the affinity for both; the
Redis key is the session's hash with the TTL as its expiry, and the affinity ends with it."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from tandem.common.cluster_state import ClusterState
from tandem.common.embedded_redis import EmbeddedRedis
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler import RouteRequest, Scheduler, SchedulerConfig
from tandem.scheduler.affinity import AffinityStore, session_hash

TTL_S = 1.0
CONFIG = SchedulerConfig(refresh_interval_s=0.05, kv_events_block_ms=100, affinity_ttl_s=TTL_S, speculative_ttl_s=0.0)
RAW_KEY = "user-42/conversation-7"


def info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(worker_id, WorkerRole.DECODE, f"127.0.0.1:{7100 + int(worker_id[1:])}", "ab12", 1024, "t")


def load(waiting: int = 0, queued_tokens: int = 0) -> WorkerLoad:
    return WorkerLoad(waiting, 0, queued_tokens, 0, 1024, time.time())


class Gateway:
    """What one gateway holds for routing: its scheduler and its affinity store (own clients)."""

    def __init__(self, server: EmbeddedRedis) -> None:
        self.client = server.client(socket_timeout=2.0, socket_connect_timeout=2.0)
        self.scheduler = Scheduler(ClusterState(self.client, "test"), CONFIG)
        self.aio = aioredis.Redis.from_url(server.url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.store = AffinityStore(self.aio, "test", TTL_S, 2.0)
        self.seq = 0

    async def route(self, session: str | None) -> str:
        """The pipeline's calls for one request: read the affinity, route, remember."""
        self.scheduler.refresh_now()
        worker = await self.store.worker_of(session) if session is not None else None
        self.seq += 1
        decision = self.scheduler.route(RouteRequest(f"r{self.seq}", 64, (1, 2, 3, 4), self.seq, worker))
        self.scheduler.decode_done(decision)
        self.scheduler.prefill_done(decision, 64)
        if session is not None:
            await self.store.remember(session, decision.decode.worker_id)
        return decision.decode.worker_id

    async def close(self) -> None:
        await self.aio.aclose()
        self.client.close()


def test_two_gateways_share_the_affinity(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> None:
    state = ClusterState(redis_client, "test")
    for worker_id in ("d0", "d1"):
        state.register(info(worker_id), 30.0)
        state.publish_load(worker_id, load(), 30.0)
    session = session_hash(RAW_KEY)

    async def scenario() -> None:
        a, b = Gateway(redis_server), Gateway(redis_server)
        try:
            first = await a.route(session)  # unknown session: the policy breaks the tie
            (other,) = {"d0", "d1"} - {first}
            # `first` gets busier (within the limits): B still follows the session, a new request does not
            state.publish_load(first, load(waiting=1, queued_tokens=500), 30.0)
            assert await b.route(None) == other
            assert await b.route(session) == first
            # the Redis key: the hash (never the raw key), the worker, the TTL as its expiry
            keys = redis_client.keys("tandem:test:session:*")
            assert keys == [f"tandem:test:session:{session}".encode()]
            assert redis_client.get(keys[0]) == first.encode()
            assert 0 < redis_client.pttl(keys[0]) <= TTL_S * 1000
            strings = [k for k in redis_client.keys("*") if redis_client.type(k) == b"string"]
            assert not [k for k in strings if RAW_KEY.encode() in k + (redis_client.get(k) or b"")]
            # `first` over the waiting limit: normal scoring picks the other and the affinity moves, for A too
            state.publish_load(first, load(waiting=3), 30.0)
            assert await a.route(session) == other
            state.publish_load(first, load(), 30.0)
            state.publish_load(other, load(waiting=1, queued_tokens=500), 30.0)
            assert await b.route(session) == other
            # the affinity expires TTL_S after the session's last request: normal scoring again
            deadline = time.monotonic() + TTL_S + 2.0
            while redis_client.exists(keys[0]) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await a.store.worker_of(session) is None
            assert await a.route(session) == first  # the idle one
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_an_unreachable_redis_is_a_miss(unreachable_redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        port = unreachable_redis_client.connection_pool.connection_kwargs["port"]
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        store = AffinityStore(client, "test", TTL_S, 1.0)
        try:
            assert await store.worker_of("abc") is None
            await store.remember("abc", "d0")  # logged, not raised
        finally:
            await client.aclose()

    asyncio.run(scenario())
