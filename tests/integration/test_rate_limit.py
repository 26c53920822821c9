"""RateLimiter against a real redis-server: exact allow/deny sequences, atomicity, sharing."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Awaitable, Callable

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tandem.common.embedded_redis import EmbeddedRedis
from tandem.gateway.limits import RateDecision, RateLimitConfig, RateLimiter

ALLOWED = RateDecision(True, 0.0, None)
CLUSTER = "test"


def run(redis_server: EmbeddedRedis, body: Callable[[redis.asyncio.Redis], Awaitable[None]]) -> None:
    """Run `body` with a fresh async client on the fixture's server (flushed by `redis_client`)."""

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            await body(client)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_requests_bucket_exact_sequence(redis_server: EmbeddedRedis, redis_client: redis.Redis):
    async def body(client: redis.asyncio.Redis) -> None:
        limiter = RateLimiter(client, CLUSTER, RateLimitConfig(requests_per_minute=3))
        assert [await limiter.acquire("key-a", 10_000) for _ in range(3)] == [ALLOWED] * 3
        denied = await limiter.acquire("key-a", 0)
        assert denied.allowed is False and denied.limit == "requests"
        assert 19 < denied.retry_after_s <= 20.5  # one request refills in 60 / 3 = 20 s
        again = await limiter.acquire("key-a", 0)
        assert again.allowed is False and again.retry_after_s <= denied.retry_after_s
        # Another key id has its own bucket.
        assert await limiter.acquire("key-b", 0) == ALLOWED

    run(redis_server, body)
    assert sorted(redis_client.keys("*")) == [
        b"tandem:test:ratelimit:key-a:requests",
        b"tandem:test:ratelimit:key-b:requests",
    ]
    fields = redis_client.hgetall("tandem:test:ratelimit:key-a:requests")
    assert set(fields) == {b"level", b"ts_us"}
    assert 0 <= float(fields[b"level"]) < 0.01  # denials charged nothing
    # TTL = time to refill 3 requests from empty (60 s) + 1 s margin.
    assert 60_000 < redis_client.pttl("tandem:test:ratelimit:key-a:requests") <= 61_000


def test_burst_and_refill(redis_server: EmbeddedRedis, redis_client: redis.Redis):
    async def body(client: redis.asyncio.Redis) -> None:
        # 600 per minute = 10 per second, burst 2: a slot every 0.1 s.
        limiter = RateLimiter(client, CLUSTER, RateLimitConfig(requests_per_minute=600, burst_requests=2))
        assert [await limiter.acquire("k", 1) for _ in range(2)] == [ALLOWED] * 2
        denied = await limiter.acquire("k", 1)
        assert denied.limit == "requests" and 0 < denied.retry_after_s <= 0.1
        await asyncio.sleep(denied.retry_after_s + 0.02)
        assert await limiter.acquire("k", 1) == ALLOWED
        assert (await limiter.acquire("k", 1)).allowed is False

    run(redis_server, body)
    assert 0 < redis_client.pttl("tandem:test:ratelimit:k:requests") <= 1_200  # 2 / 10 s + 1 s


def test_tokens_bucket_is_independent_and_atomic(redis_server: EmbeddedRedis, redis_client: redis.Redis):
    async def body(client: redis.asyncio.Redis) -> None:
        limiter = RateLimiter(client, CLUSTER, RateLimitConfig(requests_per_minute=2, tokens_per_minute=100))
        assert await limiter.acquire("k", 60) == ALLOWED  # requests 2 -> 1, tokens 100 -> 40
        refused = await limiter.acquire("k", 50)
        assert refused.allowed is False and refused.limit == "tokens"
        assert 5.9 < refused.retry_after_s <= 6.0  # 10 tokens short at 100 / 60 per second
        # The refusal charged no request: a second one still fits, using the last 40 tokens.
        assert await limiter.acquire("k", 40) == ALLOWED
        out = await limiter.acquire("k", 0)  # 0 tokens fit; no request left
        assert out.allowed is False and out.limit == "requests" and 29 < out.retry_after_s <= 30

    run(redis_server, body)
    requests = redis_client.hgetall("tandem:test:ratelimit:k:requests")
    tokens = redis_client.hgetall("tandem:test:ratelimit:k:tokens")
    assert float(requests[b"level"]) == pytest.approx(0, abs=0.01)
    assert float(tokens[b"level"]) == pytest.approx(0, abs=0.5)
    assert 60_000 < redis_client.pttl("tandem:test:ratelimit:k:tokens") <= 61_000


def test_longest_wait_names_the_limit(redis_server: EmbeddedRedis, redis_client: redis.Redis):
    async def body(client: redis.asyncio.Redis) -> None:
        config = RateLimitConfig(requests_per_minute=1, tokens_per_minute=60)
        limiter = RateLimiter(client, CLUSTER, config)
        assert await limiter.acquire("k", 60) == ALLOWED
        # Both buckets are empty: 1 request needs 60 s, 6 tokens need 6 s -> requests.
        out = await limiter.acquire("k", 6)
        assert out.limit == "requests" and 59 < out.retry_after_s <= 60

    run(redis_server, body)


def test_oversized_token_request_is_refused_forever_without_charging(
    redis_server: EmbeddedRedis, redis_client: redis.Redis
):
    async def body(client: redis.asyncio.Redis) -> None:
        config = RateLimitConfig(requests_per_minute=5, tokens_per_minute=1000, burst_tokens=200)
        limiter = RateLimiter(client, CLUSTER, config)
        assert await limiter.acquire("k", 201) == RateDecision(False, math.inf, "tokens")
        assert await limiter.acquire("k", 200) == ALLOWED  # exactly the capacity fits

    run(redis_server, body)
    assert float(redis_client.hget("tandem:test:ratelimit:k:requests", "level")) == pytest.approx(4, abs=0.01)


def test_two_limiters_share_the_buckets(redis_server: EmbeddedRedis, redis_client: redis.Redis):
    async def body(client: redis.asyncio.Redis) -> None:
        other_client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=2.0)
        try:
            config = RateLimitConfig(requests_per_minute=3)
            a = RateLimiter(client, CLUSTER, config)
            b = RateLimiter(other_client, CLUSTER, config)
            assert await a.acquire("k", 1) == ALLOWED
            assert await b.acquire("k", 1) == ALLOWED
            assert await a.acquire("k", 1) == ALLOWED
            assert (await b.acquire("k", 1)).limit == "requests"
            assert (await a.acquire("k", 1)).limit == "requests"
            # Another cluster on the same Redis has its own buckets.
            assert await RateLimiter(other_client, "other", config).acquire("k", 1) == ALLOWED
        finally:
            await other_client.aclose()

    run(redis_server, body)


def test_concurrent_acquires_admit_exactly_the_capacity(redis_server: EmbeddedRedis, redis_client: redis.Redis):
    async def body(client: redis.asyncio.Redis) -> None:
        limiter = RateLimiter(client, CLUSTER, RateLimitConfig(requests_per_minute=10, tokens_per_minute=1000))
        results = await asyncio.gather(*(limiter.acquire("k", 100) for _ in range(25)))
        assert sum(r.allowed for r in results) == 10

    run(redis_server, body)


def test_disabled_limiter_never_talks_to_redis():
    with socket.socket() as sock:  # a port nobody listens on: any command would fail
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        # No retries: redis-py would otherwise back off for seconds before raising.
        client = redis.asyncio.Redis(
            host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            limiter = RateLimiter(client, CLUSTER, RateLimitConfig())
            assert not limiter.config.enabled
            assert await limiter.acquire("anonymous", 10**9) == ALLOWED
            # The same client really is unusable, so the line above proves nothing was sent.
            with pytest.raises(redis.ConnectionError):
                await RateLimiter(client, CLUSTER, RateLimitConfig(requests_per_minute=1)).acquire("k", 0)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_config_and_argument_validation():
    assert RateLimitConfig(requests_per_minute=3).request_capacity == 3
    assert RateLimitConfig(tokens_per_minute=9, burst_tokens=4).token_capacity == 4
    for kwargs, message in (
        ({"requests_per_minute": 0}, "requests_per_minute must be an int >= 1"),
        ({"tokens_per_minute": 1.5}, "tokens_per_minute must be an int >= 1"),
        ({"requests_per_minute": True}, "requests_per_minute must be an int >= 1"),
        ({"burst_requests": 3}, "burst_requests needs requests_per_minute"),
        ({"tokens_per_minute": 5, "burst_tokens": 0}, "burst_tokens must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            RateLimitConfig(**kwargs)

    async def main() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=1)  # never used
        limiter = RateLimiter(client, CLUSTER, RateLimitConfig(requests_per_minute=1))
        with pytest.raises(ValueError, match="key_id"):
            await limiter.acquire("a*b", 1)
        with pytest.raises(ValueError, match="num_tokens"):
            await limiter.acquire("k", -1)
        with pytest.raises(ValueError, match="cluster"):
            RateLimiter(client, "bad cluster", RateLimitConfig())
        await client.aclose()

    asyncio.run(main())
