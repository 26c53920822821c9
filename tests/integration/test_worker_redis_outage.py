"""A worker's Redis side (heartbeat, KV event publisher) through a Redis freeze (SIGSTOP longer
than the TTL) and a restart that comes back empty, against a real redis-server stopped and
resumed by pid: re-registration as soon as Redis answers, one log line per outage and no
traceback, a bounded hand-off, and the whole block set republished under a new epoch."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Iterator

import pytest

from tandem.common.block_hash import block_extra, hash_blocks
from tandem.common.cluster_state import ClusterState, connect
from tandem.common.embedded_redis import EmbeddedRedis
from tandem.common.workers import KVEventKind, KVEventRecord, WorkerInfo, WorkerLoad, WorkerRole
from tandem.engine.block_pool import BlockPool, KVEvent
from tandem.worker.heartbeat import Heartbeat
from tandem.worker.kv_events import RESYNC_CHUNK_BLOCKS, KVEventPublisher
from tests.integration.workers import wait_until

INFO = WorkerInfo("decode-0", WorkerRole.DECODE, "127.0.0.1:7002", "ab12", 64, "0.1.0")
LOAD = WorkerLoad(0, 0, 0, 0, 64, 1.0)
TTL_S = 1.0
FREEZE_S = 2.5  # longer than the TTL: the key expires on resume


class Count:
    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    s = EmbeddedRedis.start()
    try:
        yield s
    finally:
        os.kill(s.pid, signal.SIGCONT) if s.is_running else None
        s.stop()


def cached_pool(num_blocks: int, tokens: list[int]) -> BlockPool:
    """A pool holding the blocks of `tokens` (16 tokens a block) as cached, and no pending events."""
    pool = BlockPool(num_blocks)
    hashes = hash_blocks(tokens, 16, block_extra("tiny"))
    for block_id, h in zip(pool.allocate(len(hashes)), hashes):
        pool.cache_block(block_id, h)
    pool.take_events()
    return pool


def events(state: ClusterState) -> list[KVEventRecord]:
    return state.read_kv_events("0-0", count=10_000)[0]


def outage_lines(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    """The outage lines of `what`, without their varying parts (error text, durations)."""
    return [re.sub(r" after .*| \(.*", "", r.getMessage()) for r in caplog.records if r.getMessage().startswith(what)]


def test_heartbeat_reregisters_at_once_after_a_freeze(server: EmbeddedRedis, caplog: pytest.LogCaptureFixture) -> None:
    state = ClusterState(connect(server.url, 0.3))
    resyncs: list[float] = []
    hb = Heartbeat(state, INFO, lambda: LOAD, ttl_s=TTL_S, on_reregistered=lambda: resyncs.append(time.monotonic()))
    with caplog.at_level(logging.INFO, logger="tandem.worker.heartbeat"):
        hb.start()
        try:
            assert hb.wait_registered(5.0)
            os.kill(server.pid, signal.SIGSTOP)
            time.sleep(FREEZE_S)
            os.kill(server.pid, signal.SIGCONT)
            resumed = time.monotonic()
            assert wait_until(lambda: len(resyncs) == 1, 5.0)
            # re-registered within a few retry intervals and client timeouts, not a TTL later
            assert resyncs[0] - resumed < 1.5
            assert state.list_workers() == [INFO]
        finally:
            hb.stop(deregister=True)
    assert hb.num_reregistrations == 1
    assert outage_lines(caplog, "heartbeat of decode-0") == [
        "heartbeat of decode-0: Redis unreachable",
        "heartbeat of decode-0: Redis reachable again",
    ]
    assert not [r for r in caplog.records if r.exc_info]


def test_publisher_drops_during_an_outage_then_republishes_the_block_set(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    state = ClusterState(connect(server.url, 0.3))
    dropped, resyncs = Count(), Count()
    publisher = KVEventPublisher(state, "decode-0", epoch=5, dropped=dropped, resyncs=resyncs)
    publisher.probe_interval_s = 0.1
    pool = cached_pool(8, list(range(64)))  # 4 cached blocks
    held = sorted(pool.cached_hashes())
    with caplog.at_level(logging.INFO, logger="tandem.worker.kv_events"):
        publisher.start()
        try:
            publisher.put([KVEvent(KVEventKind.STORED, (held[0],))])
            assert wait_until(lambda: len(events(state)) == 1, 5.0)
            os.kill(server.pid, signal.SIGSTOP)
            for i in range(20):  # the step loop goes on: 20 steps of events while Redis is frozen
                publisher.collect(pool)
                publisher.put([KVEvent(KVEventKind.STORED, (held[1 + i % 3],))])
                time.sleep(0.05)
            os.kill(server.pid, signal.SIGCONT)
            assert wait_until(lambda: (publisher.collect(pool), resyncs.value == 1)[1], 5.0, 0.05)
        finally:
            publisher.stop()
    records = events(state)
    assert dropped.value == 20
    new_epoch = publisher.epoch
    assert new_epoch > 5
    assert records[0] == KVEventRecord("decode-0", 5, 1, KVEventKind.STORED, (held[0],))
    # The XADD that timed out in the freeze stays buffered in the server, which runs it on
    # resume (with the client's one retry: at most twice, one seq): the index skips the copy.
    assert {(r.epoch, r.seq) for r in records[1:] if r.epoch == 5} <= {(5, 2)}
    assert [r for r in records if r.epoch != 5] == [
        KVEventRecord("decode-0", new_epoch, 1, KVEventKind.CLEARED, ()),
        KVEventRecord("decode-0", new_epoch, 2, KVEventKind.STORED, tuple(held)),
    ]
    assert outage_lines(caplog, "KV events of decode-0") == [
        "KV events of decode-0: Redis unreachable",
        "KV events of decode-0: Redis reachable again",
    ]
    assert not [r for r in caplog.records if r.exc_info]


def test_publisher_queue_is_bounded_and_overflow_resyncs() -> None:
    dropped = Count()
    publisher = KVEventPublisher(None, "decode-0", epoch=1, max_pending=2, dropped=dropped)  # thread not started
    pool = cached_pool(4, list(range(32)))
    for n in (1, 2, 3):
        publisher.put([KVEvent(KVEventKind.STORED, (i,)) for i in range(n)])
    assert dropped.value == 3  # the third batch (3 events) did not fit
    publisher.collect(pool)  # the overflow asked for a resync: the set replaces the queue
    assert publisher._queue.qsize() == 1
    assert publisher._queue.get_nowait().block_hashes == frozenset(pool.cached_hashes())


def test_restart_empty_reregisters_and_republishes_in_chunks(
    server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    state = ClusterState(connect(server.url, 0.3))
    resyncs = Count()
    publisher = KVEventPublisher(state, "decode-0", epoch=5, resyncs=resyncs)
    num_blocks = RESYNC_CHUNK_BLOCKS + 10
    pool = cached_pool(num_blocks, list(range(16 * num_blocks)))
    hb = Heartbeat(state, INFO, lambda: LOAD, ttl_s=TTL_S, on_reregistered=publisher.request_resync)
    port = server.port
    publisher.start()
    hb.start()
    try:
        assert hb.wait_registered(5.0)
        server.stop()
        time.sleep(0.5)
        restarted = EmbeddedRedis.start(port=port)
        try:
            assert wait_until(lambda: state.list_workers() == [INFO], 5.0)
            assert wait_until(lambda: (publisher.collect(pool), resyncs.value == 1)[1], 5.0, 0.05)
            records = events(state)
        finally:
            hb.stop(deregister=True)
            restarted.stop()
    finally:
        publisher.stop()
    held = sorted(pool.cached_hashes())
    epoch = publisher.epoch
    assert records == [
        KVEventRecord("decode-0", epoch, 1, KVEventKind.CLEARED, ()),
        KVEventRecord("decode-0", epoch, 2, KVEventKind.STORED, tuple(held[:RESYNC_CHUNK_BLOCKS])),
        KVEventRecord("decode-0", epoch, 3, KVEventKind.STORED, tuple(held[RESYNC_CHUNK_BLOCKS:])),
    ]


def test_publisher_merges_queued_batches_and_adjacent_events_of_one_kind(server: EmbeddedRedis) -> None:
    """What piled up while the thread was busy goes out together, adjacent events of one kind
    as one XADD, in order (the thread starts after the puts, so all three batches are queued)."""
    state = ClusterState(connect(server.url, 0.3))
    dropped = Count()
    publisher = KVEventPublisher(state, "decode-0", epoch=5, dropped=dropped)
    stored, removed = KVEventKind.STORED, KVEventKind.REMOVED
    publisher.put([KVEvent(stored, (11,)), KVEvent(stored, (12,))])
    publisher.put([KVEvent(stored, (13,)), KVEvent(removed, (11,))])
    publisher.put([KVEvent(removed, (12,)), KVEvent(stored, (14,))])
    publisher.start()
    try:
        assert wait_until(lambda: len(events(state)) == 3, 5.0)
        time.sleep(0.3)  # nothing more comes
        records = events(state)
    finally:
        publisher.stop()
    assert records == [
        KVEventRecord("decode-0", 5, 1, stored, (11, 12, 13)),
        KVEventRecord("decode-0", 5, 2, removed, (11, 12)),
        KVEventRecord("decode-0", 5, 3, stored, (14,)),
    ]
    assert dropped.value == 0
