"""ClusterState, Heartbeat and EmbeddedRedis against a real redis-server process."""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tandem.common.cluster_state import ClusterState
from tandem.common.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from tandem.common.workers import KVEventKind, KVEventRecord, WorkerInfo, WorkerLoad, WorkerRole
from tandem.worker.heartbeat import Heartbeat

PREFILL = WorkerInfo(
    "p-0",
    WorkerRole.PREFILL,
    "127.0.0.1:7001",
    "ab12",
    512,
    "0.1.0",
    32,
    "tiny-llama",
    7,
    0xABCDEF,
    1234,
    "fp8",
    host_id="host-a1",
)
DECODE = WorkerInfo("d-0", WorkerRole.DECODE, "127.0.0.1:7002", "ab12", 1024, "0.1.0")
LOAD = WorkerLoad(
    waiting=3,
    running=7,
    queued_prefill_tokens=4096,
    kv_blocks_used=100,
    kv_blocks_total=1024,
    timestamp_s=1_700_000_000.25,
    spec_draft_tokens=500,
    spec_accepted_tokens=321,
)


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> bool:
    """Poll `predicate` until true or `timeout_s` passed; return its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


@pytest.fixture
def state(redis_client: redis.Redis) -> ClusterState:
    return ClusterState(redis_client, cluster="test")


def test_register_list_deregister_round_trip(state: ClusterState, redis_client: redis.Redis):
    state.register(PREFILL, ttl_s=5)
    state.register(DECODE, ttl_s=5)
    assert state.list_workers() == [DECODE, PREFILL]  # sorted by id, every field exact
    assert state.list_workers(WorkerRole.PREFILL) == [PREFILL]
    assert state.list_workers(WorkerRole.DECODE) == [DECODE]
    assert state.get_worker("p-0") == PREFILL
    assert redis_client.hgetall("tandem:test:worker:p-0") == {
        b"role": b"prefill",
        b"address": b"127.0.0.1:7001",
        b"fingerprint": b"ab12",
        b"capacity_blocks": b"512",
        b"version": b"0.1.0",
        b"block_size": b"32",
        b"model_id": b"tiny-llama",
        b"block_hash_version": b"7",
        b"kv_epoch": b"1234",
        b"kv_cache_dtype": b"fp8",
        b"reference_hash": b"0000000000abcdef",  # 16 hex digits
        b"host_id": b"host-a1",
    }
    # A worker that publishes no host id (DECODE: "") never shares memory; it reads back as "".
    assert redis_client.hget("tandem:test:worker:d-0", "host_id") == b""
    # A worker without a reference hash (DECODE) has no such field; it reads back as None.
    assert b"reference_hash" not in redis_client.hgetall("tandem:test:worker:d-0")
    assert 4000 < redis_client.pttl("tandem:test:worker:p-0") <= 5000
    # Another cluster on the same Redis sees nothing.
    assert ClusterState(redis_client, cluster="other").list_workers() == []

    state.publish_load("p-0", LOAD)
    assert state.get_load("p-0") == LOAD
    assert redis_client.hget("tandem:test:load:p-0", "spec_accepted_tokens") == b"321"
    # A load from a worker that predates speculative decoding reads back with zero drafts.
    redis_client.hdel("tandem:test:load:p-0", "spec_draft_tokens", "spec_accepted_tokens")
    older = state.get_load("p-0")
    assert older is not None and (older.spec_draft_tokens, older.spec_acceptance_rate) == (0, None)
    state.deregister("p-0")
    assert state.list_workers() == [DECODE]
    assert state.get_worker("p-0") is None and state.get_load("p-0") is None


def test_heartbeat_refreshes_ttl_or_reports_missing_key(state: ClusterState, redis_client: redis.Redis):
    assert state.heartbeat("p-0", ttl_s=5) is False
    state.register(PREFILL, ttl_s=1)
    assert state.heartbeat("p-0", ttl_s=5) is True
    assert redis_client.pttl("tandem:test:worker:p-0") > 4000


def test_stopped_heartbeat_expires_within_ttl(state: ClusterState):
    hb = Heartbeat(state, PREFILL, lambda: LOAD, ttl_s=1.0, interval_s=0.2)
    hb.start()
    assert hb.wait_registered(timeout_s=2.0)
    assert wait_until(lambda: state.get_load("p-0") == LOAD, 1.0)
    hb.stop(deregister=False)
    stopped_at = time.monotonic()
    assert not hb.is_alive
    assert state.list_workers() == [PREFILL]  # still within its TTL
    assert wait_until(lambda: state.list_workers() == [], timeout_s=1.5)
    assert time.monotonic() - stopped_at <= 1.0 + 0.3  # TTL plus Redis' expiry granularity
    assert state.get_load("p-0") is None


def test_heartbeat_reregisters_after_key_loss_and_deregisters_on_stop(state: ClusterState, redis_client: redis.Redis):
    loads = iter(range(1_000_000))
    hb = Heartbeat(state, DECODE, lambda: WorkerLoad(0, next(loads), 0, 0, 8, time.time()), ttl_s=1.0, interval_s=0.1)
    hb.start()
    try:
        assert hb.wait_registered(timeout_s=2.0)
        redis_client.delete("tandem:test:worker:d-0")
        assert state.list_workers() == []
        assert wait_until(lambda: state.list_workers() == [DECODE], timeout_s=1.0)
        running_before = state.get_load("d-0").running
        assert wait_until(lambda: state.get_load("d-0").running > running_before, 1.0)
    finally:
        hb.stop(deregister=True)
    assert state.list_workers() == [] and state.get_load("d-0") is None


def test_heartbeat_survives_redis_outage_and_load_fn_errors(caplog: pytest.LogCaptureFixture):
    def broken_load() -> WorkerLoad:
        raise RuntimeError("engine counters unavailable")

    with EmbeddedRedis.start() as server:
        client = server.client(socket_timeout=1.0, socket_connect_timeout=1.0)
        state = ClusterState(client, cluster="test")
        hb = Heartbeat(state, PREFILL, broken_load, ttl_s=1.0, interval_s=0.05)
        with caplog.at_level(logging.WARNING):
            hb.start()
            assert hb.wait_registered(timeout_s=2.0)
            assert wait_until(lambda: "load_fn of p-0 failed" in caplog.text, 1.0)
            server.stop()
            assert wait_until(lambda: "heartbeat of p-0: Redis unreachable" in caplog.text, 4.0)
            assert hb.is_alive
            hb.stop(deregister=True)  # logs, does not raise
        assert not hb.is_alive
        assert "could not deregister p-0" in caplog.text
        client.close()


def test_load_publish_and_read(state: ClusterState, redis_client: redis.Redis):
    assert state.get_load("p-0") is None
    state.publish_load("p-0", LOAD, ttl_s=3)
    assert state.get_load("p-0") == LOAD
    assert state.get_load("p-0").kv_cache_usage == pytest.approx(100 / 1024)
    assert 2000 < redis_client.pttl("tandem:test:load:p-0") <= 3000
    newer = WorkerLoad(0, 1, 0, 1024, 1024, 1_700_000_001.5)
    state.publish_load("p-0", newer)
    assert state.get_load("p-0") == newer


def test_kv_events_round_trip_in_order_and_incrementally(state: ClusterState, redis_client: redis.Redis):
    big = [2**63, 2**64 - 1, 2**63 + 12345, 0, 1]
    assert state.append_kv_events("p-0", 7, KVEventKind.STORED, big) == KVEventRecord(
        "p-0", 7, 1, KVEventKind.STORED, tuple(big)
    )
    state.append_kv_events("d-0", 9, KVEventKind.STORED, [42])
    state.append_kv_events("p-0", 7, KVEventKind.REMOVED, [2**64 - 1])
    state.append_kv_events("p-0", 7, KVEventKind.CLEARED, [])
    # The stream stores 8 little-endian bytes per hash.
    (_, first), *_ = redis_client.xrange("tandem:test:kv_events", count=1)
    assert first[b"hashes"] == struct.pack("<5Q", *big)

    records, last_id = state.read_kv_events("0-0", count=2)
    assert records == [
        KVEventRecord("p-0", 7, 1, KVEventKind.STORED, tuple(big)),
        KVEventRecord("d-0", 9, 1, KVEventKind.STORED, (42,)),
    ]
    records, last_id = state.read_kv_events(last_id)
    assert records == [
        KVEventRecord("p-0", 7, 2, KVEventKind.REMOVED, (2**64 - 1,)),
        KVEventRecord("p-0", 7, 3, KVEventKind.CLEARED, ()),
    ]
    assert state.read_kv_events(last_id) == ([], last_id)
    started = time.monotonic()
    assert state.read_kv_events(last_id, block_ms=100) == ([], last_id)
    assert time.monotonic() - started < 1.0
    # A new epoch (a restarted worker) starts again at seq 1.
    state.append_kv_events("p-0", 8, KVEventKind.STORED, [5])
    assert state.read_kv_events(last_id, block_ms=100)[0] == [KVEventRecord("p-0", 8, 1, KVEventKind.STORED, (5,))]


def test_kv_events_reject_bad_input_without_using_a_seq(state: ClusterState):
    with pytest.raises(ValueError):
        state.append_kv_events("p-0", 1, KVEventKind.STORED, [2**64])
    with pytest.raises(ValueError):
        state.append_kv_events("p-0", 1, KVEventKind.STORED, [-1])
    with pytest.raises(ValueError):
        state.append_kv_events("p-0", 1, KVEventKind.REMOVED, [])
    with pytest.raises(ValueError):
        state.append_kv_events("p-0", 1, KVEventKind.CLEARED, [3])
    assert state.append_kv_events("p-0", 1, KVEventKind.STORED, [3]).seq == 1


def test_kv_events_are_trimmed_to_about_maxlen(state: ClusterState, redis_client: redis.Redis):
    num_events = 300
    for i in range(num_events):
        state.append_kv_events("p-0", 1, KVEventKind.STORED, [i], maxlen=10)
    assert redis_client.xlen("tandem:test:kv_events") < num_events


def test_malformed_entries_are_skipped_with_a_warning(
    state: ClusterState, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
):
    state.register(PREFILL)
    redis_client.hset(
        "tandem:test:worker:bad-role",
        mapping={"role": "router", "address": "x:1", "fingerprint": "ab", "capacity_blocks": "1", "version": "1"},
    )
    redis_client.hset(
        "tandem:test:worker:bad-cap",
        mapping={"role": "decode", "address": "x:1", "fingerprint": "ab", "capacity_blocks": "lots", "version": "1"},
    )
    redis_client.hset("tandem:test:worker:no-addr", mapping={"role": "decode"})
    redis_client.hset(
        "tandem:test:worker:bad*id",
        mapping={"role": "decode", "address": "x:1", "fingerprint": "ab", "capacity_blocks": "1", "version": "1"},
    )
    redis_client.hset("tandem:test:load:p-0", mapping={"waiting": "-3"})
    stream = "tandem:test:kv_events"
    good = {"worker": "p-0", "epoch": "1", "seq": "1", "kind": "stored", "hashes": struct.pack("<Q", 99)}
    redis_client.xadd(stream, {**good, "hashes": b"\x01" * 7})  # not a multiple of 8 bytes
    redis_client.xadd(stream, {**good, "kind": "evicted"})
    redis_client.xadd(stream, {k: v for k, v in good.items() if k != "seq"})
    redis_client.xadd(stream, {**good, "worker": b"\xff\xfe"})
    redis_client.xadd(stream, {**good, "epoch": "-1"})
    redis_client.xadd(stream, {**good, "kind": "cleared"})  # cleared with hashes
    good_id = redis_client.xadd(stream, good).decode()
    redis_client.xadd(stream, {"junk": "1"})
    last = redis_client.xadd(stream, {**good, "seq": "2", "hashes": b""}).decode()

    with caplog.at_level(logging.WARNING, logger="tandem.common.cluster_state"):
        assert state.list_workers() == [PREFILL]
        assert state.get_load("p-0") is None
        records, last_id = state.read_kv_events("0-0")
    assert records == [KVEventRecord("p-0", 1, 1, KVEventKind.STORED, (99,))]
    assert last_id == last  # moved past the malformed tail
    assert good_id < last_id
    # Throttled per key kind (a hostile writer cannot flood the log): the first of each kind only.
    assert caplog.text.count("skipping malformed worker entry") == 1
    assert caplog.text.count("skipping malformed load entry") == 1
    assert caplog.text.count("skipping malformed kv event") == 1
    assert "Traceback" not in caplog.text


def test_a_registration_without_its_hash_scheme_is_malformed(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
):
    """An entry that lacks block_size, model_id or block_hash_version (an older worker), or
    has a bad one, is skipped: its hashes cannot be trusted for prefix routing."""
    state = ClusterState(redis_client, cluster="test", malformed_log_interval_s=0.0)  # every warning logged
    state.register(DECODE)
    assert state.get_worker("d-0") == DECODE
    assert (DECODE.block_size, DECODE.model_id, DECODE.block_hash_version) == (16, "", 1)
    for name, value in (("block_size", None), ("model_id", None), ("block_hash_version", None), ("block_size", "0")):
        state.register(DECODE)
        if value is None:
            redis_client.hdel("tandem:test:worker:d-0", name)
        else:
            redis_client.hset("tandem:test:worker:d-0", name, value)
        with caplog.at_level(logging.WARNING):
            assert state.get_worker("d-0") is None
        assert caplog.records[-1].getMessage() == (
            f"skipping malformed worker entry 'd-0': missing field {name!r}"
            if value is None
            else "skipping malformed worker entry 'd-0': block_size must be an int >= 1, got 0"
        )


def test_cluster_state_rejects_bad_config(redis_server: EmbeddedRedis):
    text_client = redis_server.client(decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses=False"):
        ClusterState(text_client)
    text_client.close()
    bytes_client = redis_server.client()
    with pytest.raises(ValueError, match="cluster"):
        ClusterState(bytes_client, cluster="a*b")
    bytes_client.close()
    with pytest.raises(ValueError):
        WorkerInfo("p:0", WorkerRole.PREFILL, "h:1", "ab", 1, "v")
    with pytest.raises(ValueError):
        WorkerLoad(0, 0, 0, kv_blocks_used=2, kv_blocks_total=1, timestamp_s=0.0)
    with pytest.raises(ValueError, match="spec_accepted_tokens must be <= spec_draft_tokens"):
        WorkerLoad(0, 0, 0, 0, 1, 0.0, spec_draft_tokens=3, spec_accepted_tokens=4)
    with pytest.raises(ValueError):
        Heartbeat(ClusterState(redis_server.client()), PREFILL, lambda: LOAD, ttl_s=1, interval_s=1)


def test_embedded_redis_stop_leaves_no_process_and_no_files():
    first = EmbeddedRedis.start()
    second = EmbeddedRedis.start()
    try:
        assert first.port != second.port
        assert first.url == f"redis://127.0.0.1:{first.port}/0"
        assert first.client().ping() and second.client().ping()
    finally:
        second.stop()
    pid, data_dir = first.pid, first.data_dir
    assert data_dir.is_dir()
    first.stop()
    first.stop()  # idempotent
    assert not first.is_running and not data_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.kill(second.pid, 0)


def test_embedded_redis_reports_missing_binary_and_busy_port(tmp_path: Path):
    with pytest.raises(EmbeddedRedisError, match="not found"):
        EmbeddedRedis.start(binary_path=tmp_path / "redis-server")
    with EmbeddedRedis.start() as server:
        with pytest.raises(EmbeddedRedisError, match="Address already in use"):
            EmbeddedRedis.start(port=server.port)
        assert server.client().ping()


@pytest.mark.parametrize(
    ("address", "accepted"),
    [
        ("127.0.0.1:7001", True),
        ("tandem-prefill-0.tandem.default.svc.cluster.local:50051", True),
        ("[::1]:7001", True),
        ("unix:/tmp/evil.sock", False),  # a gRPC target scheme, not host:port
        ("dns:///evil.example:443", False),
        ("127.0.0.1:0", False),
        ("127.0.0.1:65536", False),
        ("127.0.0.1", False),
        ("evil.example:80/path", False),
        ("-x:1", False),
        ("a" * 254 + ":1", False),
    ],
)
def test_only_host_port_addresses_are_accepted(
    state: ClusterState, redis_client: redis.Redis, address: str, accepted: bool
) -> None:
    state.register(PREFILL)
    redis_client.hset("tandem:test:worker:p-0", "address", address)
    expected = dataclasses.replace(PREFILL, address=address)
    assert state.list_workers() == ([expected] if accepted else [])
    assert state.get_worker("p-0") == (expected if accepted else None)


def test_keys_of_the_wrong_type_are_skipped_not_raised(
    state: ClusterState, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile writer's string or list under worker:/load: keys hides nothing else: the other
    entries are read, and the reader never raises (a raise would look like a Redis outage)."""
    state.register(PREFILL)
    state.register(DECODE)
    state.publish_load("p-0", WorkerLoad(1, 2, 3, 4, 5, 6.0))
    redis_client.set("tandem:test:worker:evil", "127.0.0.1:9")
    redis_client.rpush("tandem:test:load:d-0", "x")
    with caplog.at_level(logging.WARNING, logger="tandem.common.cluster_state"):
        assert state.list_workers() == [DECODE, PREFILL]
        assert state.get_worker("evil") is None
        assert state.get_loads(["p-0", "d-0"]) == {"p-0": WorkerLoad(1, 2, 3, 4, 5, 6.0), "d-0": None}
    assert caplog.text.count("skipping malformed worker entry 'evil': WRONGTYPE") == 1  # throttled: 1 of 2
    assert caplog.text.count("skipping malformed load entry 'd-0': WRONGTYPE") == 1
    assert "Traceback" not in caplog.text
