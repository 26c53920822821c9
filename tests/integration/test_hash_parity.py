"""Hash parity at registration against a real redis-server: the scheduler's routing mode and
the view it publishes for `tandem status`, a worker restarted under the same id (its old
index entries are purged at re-registration), and a worker record of an older version."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import redis

from tandem.common.block_hash import block_extra, hash_blocks, reference_block_hash
from tandem.common.cluster_state import ClusterState
from tandem.common.gateway_view import RoutingMode
from tandem.common.workers import KVEventKind, WorkerInfo, WorkerLoad, WorkerRole
from tandem.launcher.status import GatewayRow, collect
from tandem.scheduler import Scheduler, SchedulerConfig
from tandem.scheduler.gateway_report import GatewayReport
from tests.integration.workers import wait_until

CONFIG = SchedulerConfig(refresh_interval_s=0.05, kv_events_block_ms=100)
MODEL = "tiny-llama"
PROMPT_A = tuple(hash_blocks(list(range(1000, 1064)), 16, block_extra(MODEL)))  # 4 blocks
PROMPT_B = tuple(hash_blocks(list(range(5000, 5032)), 16, block_extra(MODEL)))  # 2 blocks
IDLE = WorkerLoad(0, 0, 0, 0, 1024, 0.0)
OLD = "no reference block hash published (a worker older than the hash parity check)"
WAIT_S = 10.0  # generous: a loaded 2-core machine


def worker(worker_id: str, kv_epoch: int) -> WorkerInfo:
    """A worker of this version as it registers: its reference hash and its first KV epoch."""
    return WorkerInfo(
        worker_id,
        WorkerRole.DECODE,
        "127.0.0.1:7000",
        "ab12",
        1024,
        "t",
        16,
        MODEL,
        reference_hash=reference_block_hash(MODEL, 16),
        kv_epoch=kv_epoch,
    )


@pytest.fixture
def state(redis_client: redis.Redis) -> ClusterState:
    return ClusterState(redis_client, cluster="test")


@pytest.fixture
def scheduler(state: ClusterState) -> Iterator[Scheduler]:
    s = Scheduler(state, CONFIG, model_id=MODEL, gateway_id="gw-1")
    try:
        yield s
    finally:
        s.stop()


def register(state: ClusterState, info: WorkerInfo) -> None:
    state.register(info, ttl_s=30.0)
    state.publish_load(info.worker_id, IDLE, ttl_s=30.0)


def xadd_raw(client: redis.Redis, worker_id: str, epoch: int, seq: int, hashes: tuple[int, ...]) -> None:
    """An event with the seq the test chooses (a publisher never skips one: this makes a gap)."""
    packed = b"".join(h.to_bytes(8, "little") for h in hashes)
    fields = {"worker": worker_id, "epoch": str(epoch), "seq": str(seq), "kind": "stored", "hashes": packed}
    client.xadd("tandem:test:kv_events", fields)  # type: ignore[arg-type]


def gateways(state: ClusterState) -> tuple[GatewayRow, ...]:
    return collect(state, "test").gateways


def eventually(predicate: Callable[[], bool]) -> None:
    assert wait_until(predicate, WAIT_S), "condition not met in time"


def test_routing_mode_load_only_exact_degraded_exact_in_the_gauge_source_the_view_and_the_log(
    state: ClusterState, redis_client: redis.Redis, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    register(state, worker("d-0", kv_epoch=100))
    with caplog.at_level(logging.INFO, logger="tandem.scheduler.gateway_report"):
        scheduler.start()
        assert scheduler.wait_caught_up(WAIT_S)
        eventually(lambda: gateways(state) == (GatewayRow("gw-1", "load_only", 0),))
        assert scheduler.routing_mode() is RoutingMode.LOAD_ONLY
        assert 0 < redis_client.pttl("tandem:test:gateway:gw-1") <= 5000

        state.append_kv_events("d-0", 100, KVEventKind.STORED, PROMPT_A)  # seq 1
        eventually(lambda: scheduler.routing_mode() is RoutingMode.EXACT)
        eventually(lambda: gateways(state) == (GatewayRow("gw-1", "exact", 0),))

        xadd_raw(redis_client, "d-0", 100, 3, PROMPT_B)  # seq 2 was lost
        eventually(lambda: scheduler.routing_mode() is RoutingMode.DEGRADED)
        eventually(lambda: gateways(state) == (GatewayRow("gw-1", "degraded", 0),))
        assert scheduler._index.blocks("d-0") == frozenset(PROMPT_A + PROMPT_B)  # kept: the best guess

        # The worker republishes its block set under a new epoch: the view is complete again.
        state.append_kv_events("d-0", 200, KVEventKind.CLEARED, ())
        state.append_kv_events("d-0", 200, KVEventKind.STORED, PROMPT_A)
        eventually(lambda: scheduler.routing_mode() is RoutingMode.EXACT)
        eventually(lambda: gateways(state) == (GatewayRow("gw-1", "exact", 0),))
    assert scheduler._index.blocks("d-0") == frozenset(PROMPT_A)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "tandem.scheduler.gateway_report"] == [
        ("INFO", "routing mode: load_only"),
        ("INFO", "routing mode: exact"),
        ("WARNING", "routing mode: degraded (seq gap in the KV events of d-0)"),
        ("INFO", "routing mode: exact"),
    ]
    scheduler.stop()
    # The view expires with its TTL once the gateway is gone; until then it stays.
    assert redis_client.exists("tandem:test:gateway:gw-1") == 1


def test_reregistration_under_a_new_epoch_purges_the_stale_entries(
    state: ClusterState, redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    """A worker crashes and restarts under the same id before its key expires: the registry
    never sees it leave, and the new process publishes no event until it caches a block. Its
    registration (a new KV epoch) must purge what the index held for the old process."""
    register(state, worker("d-0", kv_epoch=100))
    register(state, worker("d-1", kv_epoch=100))
    state.append_kv_events("d-0", 100, KVEventKind.STORED, PROMPT_A)
    state.append_kv_events("d-1", 100, KVEventKind.STORED, PROMPT_B)
    scheduler.start()
    eventually(lambda: scheduler._index.blocks("d-0") == frozenset(PROMPT_A))
    eventually(lambda: scheduler._index.blocks("d-1") == frozenset(PROMPT_B))

    register(state, worker("d-0", kv_epoch=300))  # the restarted process registers
    eventually(lambda: scheduler._index.blocks("d-0") == frozenset())
    assert scheduler._index.blocks("d-1") == frozenset(PROMPT_B)  # the other worker keeps its own
    assert scheduler._index.match(PROMPT_A, ["d-0", "d-1"]) == {"d-0": 0, "d-1": 0}  # nothing stale
    assert scheduler.routing_mode() is RoutingMode.EXACT  # d-1's entries, no gap

    # A late event of the old process (still in flight) is ignored; the new one's rebuild.
    state.append_kv_events("d-0", 100, KVEventKind.STORED, PROMPT_B)  # old epoch, seq 2
    state.append_kv_events("d-0", 300, KVEventKind.STORED, PROMPT_B[:1])  # new epoch, seq 1
    eventually(lambda: scheduler._index.blocks("d-0") == frozenset(PROMPT_B[:1]))
    assert (scheduler._index.num_gaps("d-0"), scheduler.routing_mode()) == (0, RoutingMode.EXACT)
    assert scheduler._index.match(PROMPT_B, ["d-0", "d-1"]) == {"d-0": 1, "d-1": 2}


def test_a_worker_record_of_an_older_version_is_read_refused_and_shown_incompatible(
    state: ClusterState, redis_client: redis.Redis, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
) -> None:
    good = worker("d-0", kv_epoch=1)
    register(state, good)
    # What an older worker writes: no reference_hash, no kv_epoch.
    redis_client.hset(
        "tandem:test:worker:d-old",
        mapping={
            "role": "decode",
            "address": "127.0.0.1:7009",
            "fingerprint": "ab12",
            "capacity_blocks": "64",
            "version": "0.0.9",
            "block_size": "16",
            "model_id": MODEL,
            "block_hash_version": "1",
        },
    )
    # A hostile or corrupt reference hash: the record is skipped, never routed to.
    state.register(replace(good, worker_id="d-bad"), ttl_s=30.0)
    redis_client.hset("tandem:test:worker:d-bad", "reference_hash", "zz")
    with caplog.at_level(logging.WARNING):
        assert [w.worker_id for w in state.list_workers()] == ["d-0", "d-old"]
        assert state.get_worker("d-old") == WorkerInfo(
            "d-old", WorkerRole.DECODE, "127.0.0.1:7009", "ab12", 64, "0.0.9", 16, MODEL, 1, None, 0
        )
        scheduler.refresh_now()
    assert "skipping malformed worker entry 'd-bad': invalid literal for int() with base 16: 'zz'" in caplog.messages
    assert f"not routing to worker d-old: its block hashes differ: {OLD}" in caplog.messages
    assert [s.info.worker_id for s in scheduler.workers()] == ["d-0"]
    status = collect(state, "test")
    assert [(w.worker_id, w.incompatible) for w in status.workers] == [("d-0", None), ("d-old", OLD)]
    assert status.gateways == (GatewayRow("gw-1", "load_only", 1),)


def test_the_view_is_written_when_it_changes_and_refreshed_before_its_ttl(
    state: ClusterState, redis_client: redis.Redis
) -> None:
    now_s = [100.0]
    report = GatewayReport("gw-2", refresh_interval_s=0.25, clock=lambda: now_s[0])
    assert report.ttl_s == 5.0
    key = "tandem:test:gateway:gw-2"
    report.update(state, RoutingMode.EXACT, {}, ())
    assert redis_client.hgetall(key) == {b"routing_mode": b"exact"}
    redis_client.delete(key)
    now_s[0] += 1.0
    report.update(state, RoutingMode.EXACT, {}, ())  # unchanged, and young: not written
    assert redis_client.exists(key) == 0
    now_s[0] += 5.0 / 3  # a third of the TTL since the last write
    report.update(state, RoutingMode.EXACT, {}, ())
    assert redis_client.hgetall(key) == {b"routing_mode": b"exact"}
    report.update(state, RoutingMode.EXACT, {"d-9": OLD}, ())  # changed: written at once
    assert redis_client.hgetall(key) == {b"routing_mode": b"exact", b"refused:d-9": OLD.encode()}
    assert 4000 < redis_client.pttl(key) <= 5000
    assert GatewayReport(None, 0.25).ttl_s == 5.0 and GatewayReport(None, 2.0).ttl_s == 8.0
    GatewayReport(None, 0.25).update(state, RoutingMode.EXACT, {}, ())  # no id: nothing published
    assert [v.gateway_id for v in state.list_gateway_views()] == ["gw-2"]
