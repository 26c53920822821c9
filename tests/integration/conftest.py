"""Integration fixtures: one real `redis-server` (EmbeddedRedis) per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tandem.common.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A fresh, empty server for the module; stopped (by pid) when the module is done."""
    server = EmbeddedRedis.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A bytes client on an emptied database. Socket timeout 2 s: no test can hang on Redis."""
    client = redis_server.client(socket_timeout=2.0, socket_connect_timeout=2.0)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def unreachable_redis_client() -> Iterator[redis.Redis]:
    """A client of a loopback port nobody listens on, without retries: every command fails at once."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from tandem.common.embedded_redis import free_port

    client = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    try:
        yield client
    finally:
        client.close()
