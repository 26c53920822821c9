"""Scheduler against a real redis-server: registry refresh, KV event rebuild and follow,
expired workers, Redis outages."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tandem.common.block_hash import block_extra, hash_blocks, reference_block_hash
from tandem.common.cluster_state import ClusterState
from tandem.common.embedded_redis import EmbeddedRedis
from tandem.common.workers import KVEventKind, WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler import (
    NoWorkerError,
    RouteKind,
    RouteRequest,
    Scheduler,
    SchedulerConfig,
)

CONFIG = SchedulerConfig(refresh_interval_s=0.05, kv_events_block_ms=100)
EXTRA = block_extra("tiny-llama")
PROMPT_A = list(range(1000, 2024))  # 1024 tokens, 64 blocks
PROMPT_B = list(range(5000, 6024))
IDLE = WorkerLoad(0, 0, 0, 0, 1024, 0.0)


def info(worker_id: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"127.0.0.1:{7000 + len(worker_id)}", "ab12", 1024, "t")


def request(tokens: list[int], scheduler: Scheduler) -> RouteRequest:
    hashes = tuple(hash_blocks(tokens, CONFIG.block_size, EXTRA))
    seq = scheduler.next_seq()
    return RouteRequest(f"req-{seq}", len(tokens), hashes, seq)


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def indexed_blocks(scheduler: Scheduler) -> dict[str, int]:
    return {s.info.worker_id: s.num_indexed_blocks for s in scheduler.workers()}


def claims(scheduler: Scheduler) -> dict[str, int]:
    return {s.info.worker_id: s.num_speculative_claims for s in scheduler.workers()}


@pytest.fixture
def state(redis_client: redis.Redis) -> ClusterState:
    return ClusterState(redis_client, cluster="test")


@pytest.fixture
def make_scheduler(state: ClusterState) -> Iterator[Callable[..., Scheduler]]:
    """Builds schedulers on `state`; every one is stopped at the end of the test."""
    made: list[Scheduler] = []

    def make(config: SchedulerConfig = CONFIG, clock: Callable[[], float] = time.time) -> Scheduler:
        made.append(Scheduler(state, config, clock))
        return made[-1]

    try:
        yield make
    finally:
        for sched in made:
            sched.stop(timeout_s=5.0)


@pytest.fixture
def scheduler(make_scheduler: Callable[..., Scheduler]) -> Scheduler:
    return make_scheduler()


def register(state: ClusterState, worker: WorkerInfo, ttl_s: float = 30.0, load: WorkerLoad | None = IDLE) -> None:
    state.register(worker, ttl_s)
    if load is not None:
        state.publish_load(worker.worker_id, load, ttl_s)


def test_get_loads_reads_many_workers_in_one_call(state: ClusterState):
    busy = WorkerLoad(2, 3, 400, 10, 100, 1.5)
    state.publish_load("d-0", busy)
    state.publish_load("p-0", IDLE)
    assert state.get_loads(["d-0", "missing", "p-0"]) == {"d-0": busy, "missing": None, "p-0": IDLE}
    assert state.get_loads([]) == {}


def test_index_is_rebuilt_from_the_stream_then_follows_live_events(state, make_scheduler):
    # No speculative claims here: the index is exactly what the KV events say.
    scheduler = make_scheduler(replace(CONFIG, speculative_ttl_s=0.0))
    for worker in (info("d-0", WorkerRole.DECODE), info("d-1", WorkerRole.DECODE), info("p-0", WorkerRole.PREFILL)):
        register(state, worker)
    hashes_a = hash_blocks(PROMPT_A, CONFIG.block_size, EXTRA)
    hashes_b = hash_blocks(PROMPT_B, CONFIG.block_size, EXTRA)
    # Before the scheduler starts: d-1 cached prompt A; a dead worker's events are in the stream.
    state.append_kv_events("d-1", 1, KVEventKind.STORED, hashes_a[:40])
    state.append_kv_events("d-1", 1, KVEventKind.STORED, hashes_a[40:])
    state.append_kv_events("gone", 1, KVEventKind.STORED, hashes_a)

    scheduler.start()
    assert scheduler.wait_caught_up(5.0)
    scheduler.refresh_now()  # forgets "gone", which is not registered
    assert indexed_blocks(scheduler) == {"d-0": 0, "d-1": 64, "p-0": 0}
    assert scheduler.ready()

    decision = scheduler.route(request(PROMPT_A, scheduler))
    assert (decision.kind, decision.decode.worker_id, decision.prefill) == (RouteKind.LOCAL_PREFILL, "d-1", None)
    assert decision.decode_cached_tokens == 1024

    # Live events: d-0 caches prompt B, d-1 evicts the second half of prompt A.
    state.append_kv_events("d-0", 9, KVEventKind.STORED, hashes_b)
    state.append_kv_events("d-1", 1, KVEventKind.REMOVED, hashes_a[32:])
    assert wait_until(lambda: indexed_blocks(scheduler) == {"d-0": 64, "d-1": 32, "p-0": 0}, timeout_s=5.0), (
        indexed_blocks(scheduler)
    )

    decision = scheduler.route(request(PROMPT_A, scheduler))
    # d-1: 512 uncached tokens (>= 256) -> P computes the prompt, D pulls it.
    assert (decision.kind, decision.decode.worker_id, decision.prefill.worker_id) == (
        RouteKind.DISAGGREGATED,
        "d-1",
        "p-0",
    )
    assert (decision.decode_cached_tokens, decision.prefill_cached_tokens) == (512, 0)

    decision = scheduler.route(request(PROMPT_B, scheduler))
    assert (decision.kind, decision.decode.worker_id, decision.decode_cached_tokens) == (
        RouteKind.LOCAL_PREFILL,
        "d-0",
        1024,
    )

    # A restarted worker (new epoch) starts from an empty cache.
    state.append_kv_events("d-0", 10, KVEventKind.STORED, hashes_b[:1])
    assert wait_until(lambda: indexed_blocks(scheduler)["d-0"] == 1, timeout_s=5.0)


def finish(scheduler, decision, prompt) -> None:
    """What the gateway does when a routed request is done: release its in-flight work."""
    scheduler.prefill_done(decision, len(prompt))
    scheduler.decode_done(decision)


def test_in_flight_work_spreads_a_burst_and_is_released(state, make_scheduler):
    """Between two load publications every route sees the same published load; the
    scheduler's own in-flight table spreads a burst, and releasing it restores the choice."""
    scheduler = make_scheduler(clock=lambda: 1000.0)
    for worker in (
        info("d-0", WorkerRole.DECODE),
        info("d-1", WorkerRole.DECODE),
        info("p-0", WorkerRole.PREFILL),
        info("p-1", WorkerRole.PREFILL),
    ):
        register(state, worker)
    scheduler.refresh_now()
    prompts = [[7 + i] * 300 for i in range(4)]
    burst = [scheduler.route(request(p, scheduler)) for p in prompts]
    assert [(d.prefill.worker_id, d.decode.worker_id) for d in burst] == [
        ("p-0", "d-0"),
        ("p-1", "d-1"),
        ("p-0", "d-0"),
        ("p-1", "d-1"),
    ]
    for decision, prompt in zip(burst, prompts):
        finish(scheduler, decision, prompt)
    after = scheduler.route(request([99] * 300, scheduler))
    assert (after.prefill.worker_id, after.decode.worker_id) == ("p-0", "d-0")


def test_route_claims_the_prompt_for_p_and_d_until_the_ttl(state, make_scheduler):
    now_s = [1000.0]
    scheduler = make_scheduler(clock=lambda: now_s[0])
    for worker in (info("d-0", WorkerRole.DECODE), info("d-1", WorkerRole.DECODE), info("p-0", WorkerRole.PREFILL)):
        register(state, worker)
    scheduler.refresh_now()  # not started: no KV events at all

    first = scheduler.route(request(PROMPT_A, scheduler))
    assert (first.kind, first.decode.worker_id, first.prefill.worker_id) == (
        RouteKind.DISAGGREGATED,
        "d-0",
        "p-0",
    )  # nothing cached anywhere: lowest ids
    # the prompt's chain of 64 blocks and its anchors of 1, 2, 4, ..., 32 blocks
    assert claims(scheduler) == {"d-0": 7, "d-1": 0, "p-0": 7}
    finish(scheduler, first, PROMPT_A)
    # The same prompt again, before any KV event: D already "holds" it, and keeps it longer.
    now_s[0] = 1005.0
    again = scheduler.route(request(PROMPT_A, scheduler))
    assert (again.kind, again.decode.worker_id, again.decode_cached_tokens) == (RouteKind.LOCAL_PREFILL, "d-0", 1024)
    finish(scheduler, again, PROMPT_A)

    now_s[0] = 1010.0  # p-0's claim on A (from t=1000) expires; d-0's now ends at 1015
    other = scheduler.route(request(PROMPT_B, scheduler))
    assert (other.kind, other.decode.worker_id, other.prefill.worker_id) == (RouteKind.DISAGGREGATED, "d-0", "p-0")
    assert claims(scheduler) == {"d-0": 14, "d-1": 0, "p-0": 7}
    finish(scheduler, other, PROMPT_B)

    now_s[0] = 1015.0
    later = scheduler.route(request(PROMPT_A, scheduler))
    # nobody holds A any more: an exact tie between the idle decode workers, which prefix_aware
    # rotates by seq (this is request seq 3 -> the second of d-0, d-1)
    assert (later.kind, later.decode.worker_id, later.decode_cached_tokens) == (RouteKind.DISAGGREGATED, "d-1", 0)
    assert indexed_blocks(scheduler) == {"d-0": 0, "d-1": 0, "p-0": 0}  # claims only


def test_a_worker_whose_heartbeat_expired_is_not_chosen(state, scheduler):
    ttl_s = 1.0
    register(state, info("d-fast", WorkerRole.DECODE), ttl_s=ttl_s)  # never heartbeats again
    registered_at = time.monotonic()
    register(state, info("d-slow", WorkerRole.DECODE), ttl_s=30.0)
    state.append_kv_events("d-fast", 1, KVEventKind.STORED, hash_blocks(PROMPT_A, CONFIG.block_size, EXTRA))
    scheduler.start()
    assert scheduler.wait_caught_up(5.0)
    scheduler.refresh_now()
    first = scheduler.route(request(PROMPT_A, scheduler))
    assert (first.decode.worker_id, first.decode_cached_tokens) == ("d-fast", 1024)

    assert wait_until(lambda: [s.info.worker_id for s in scheduler.workers()] == ["d-slow"], timeout_s=ttl_s + 5.0)
    # Gone once its key expired, and within one refresh interval after (plus slack for a
    # loaded test machine).
    elapsed_s = time.monotonic() - registered_at
    assert ttl_s - 0.1 <= elapsed_s <= ttl_s + CONFIG.refresh_interval_s + 1.0
    decision = scheduler.route(request(PROMPT_A, scheduler))
    assert (decision.kind, decision.decode.worker_id, decision.decode_cached_tokens) == (
        RouteKind.LOCAL_PREFILL,
        "d-slow",
        0,
    )
    assert (indexed_blocks(scheduler), claims(scheduler)) == ({"d-slow": 0}, {"d-slow": 7})
    # Its index entries were forgotten: back with no new events, it holds nothing.
    register(state, info("d-fast", WorkerRole.DECODE), ttl_s=30.0)
    scheduler.refresh_now()
    assert indexed_blocks(scheduler) == {"d-fast": 0, "d-slow": 0}
    assert claims(scheduler) == {"d-fast": 0, "d-slow": 7}


def test_workers_whose_block_hashes_differ_are_never_routed_to_and_logged_once(state, caplog):
    """The gateway's scheduler hashes with block size 16, model id tiny-llama and this code's
    hash version; workers registered with another value of any of them, or whose reference
    block hash differs (another hash function), or that publish none, are refused."""
    scheduler = Scheduler(state, CONFIG, model_id="tiny-llama")
    good = replace(
        info("d-good", WorkerRole.DECODE), model_id="tiny-llama", reference_hash=reference_block_hash("tiny-llama", 16)
    )
    register(state, good)
    register(
        state,
        replace(
            good, worker_id="d-model", model_id="other-model", reference_hash=reference_block_hash("other-model", 16)
        ),
    )
    register(
        state, replace(good, worker_id="d-block", block_size=32, reference_hash=reference_block_hash("tiny-llama", 32))
    )
    register(state, replace(good, worker_id="p-hash", role=WorkerRole.PREFILL, block_hash_version=2))
    register(state, replace(good, worker_id="d-func", reference_hash=0xABC))
    register(state, replace(good, worker_id="d-old", reference_hash=None))
    for worker_id in ("d-model", "d-block", "p-hash", "d-func", "d-old"):  # they hold the whole prompt
        state.append_kv_events(worker_id, 1, KVEventKind.STORED, hash_blocks(PROMPT_A, CONFIG.block_size, EXTRA))
    with caplog.at_level(logging.WARNING, logger="tandem.scheduler.registry"):
        for _ in range(3):
            scheduler.refresh_now()
    assert [s.info.worker_id for s in scheduler.workers()] == ["d-good"]
    assert sorted(r.getMessage() for r in caplog.records if r.name == "tandem.scheduler.registry") == [
        "not routing to worker d-block: its block hashes differ: block_size (ours 16, theirs 32), "
        "reference block hash (ours 0x874ea9bead81c218, theirs 0xe45da4c2f8a84478)",
        "not routing to worker d-func: its block hashes differ: "
        "reference block hash (ours 0x874ea9bead81c218, theirs 0x0000000000000abc): the hash function differs",
        "not routing to worker d-model: its block hashes differ: model_id (ours 'tiny-llama', theirs 'other-model'), "
        "reference block hash (ours 0x874ea9bead81c218, theirs 0x33f04255eb58fc42)",
        "not routing to worker d-old: its block hashes differ: "
        "no reference block hash published (a worker older than the hash parity check)",
        "not routing to worker p-hash: its block hashes differ: block_hash_version (ours 1, theirs 2)",
    ]
    decision = scheduler.route(request(PROMPT_A, scheduler))
    assert (decision.kind, decision.prefill, decision.decode.worker_id) == (RouteKind.LOCAL_PREFILL, None, "d-good")
    # The refused workers' KV events are skipped: the index holds none of their blocks.
    scheduler.start()
    try:
        assert scheduler.wait_caught_up(5.0)
        # d-good holds its routing claim; the refused workers, never live, hold nothing
        assert scheduler._index.worker_ids() == frozenset({"d-good"})
    finally:
        scheduler.stop()
    # A refused worker that re-registers with the gateway's values is routed to at once.
    register(state, replace(good, worker_id="d-model"))
    caplog.clear()
    scheduler.refresh_now()
    assert [s.info.worker_id for s in scheduler.workers()] == ["d-good", "d-model"]
    assert [r for r in caplog.records if r.name == "tandem.scheduler.registry"] == []


def test_no_decode_worker_means_not_ready_and_no_route(state, scheduler):
    register(state, info("p-0", WorkerRole.PREFILL))
    scheduler.refresh_now()
    assert not scheduler.ready()
    with pytest.raises(NoWorkerError):
        scheduler.route(request(PROMPT_A, scheduler))
    register(state, info("d-0", WorkerRole.DECODE), load=None)  # no load published yet
    scheduler.refresh_now()
    assert scheduler.ready()
    [d_status, p_status] = scheduler.workers()  # sorted by worker id
    assert (d_status.info.worker_id, d_status.load) == ("d-0", None)
    assert (p_status.info.worker_id, p_status.load) == ("p-0", IDLE)
    decision = scheduler.route(request(PROMPT_A, scheduler))
    assert (decision.kind, decision.decode.worker_id, decision.prefill.worker_id) == (
        RouteKind.DISAGGREGATED,
        "d-0",
        "p-0",
    )
    with pytest.raises(NoWorkerError):
        scheduler.route(request(PROMPT_A, scheduler), exclude=frozenset({"d-0"}))


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_follower_survives_an_unreachable_redis_and_stops_in_bounded_time(state, caplog):
    # No redis-py retries (its default retries a failed command for about 5 s).
    dead = redis.Redis(
        host="127.0.0.1",
        port=_closed_port(),
        socket_timeout=2.0,
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    scheduler = Scheduler(state, CONFIG, events_state=ClusterState(dead, cluster="test"))
    register(state, info("d-0", WorkerRole.DECODE))
    try:
        with caplog.at_level(logging.WARNING, logger="tandem.scheduler.scheduler"):
            scheduler.start()
            assert not scheduler.wait_caught_up(0.5)  # every read failed...
        failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kv event follow")]
        # ...and was retried with backoff, but the outage is one line, with no traceback
        assert len(failures) == 1 and failures[0].endswith("; retrying with backoff up to 2 s")
        assert "kv event follow: Redis unreachable (Error 111 connecting to" in failures[0]
        assert not [r for r in caplog.records if r.exc_info]
        assert wait_until(scheduler.ready, timeout_s=5.0)  # the refresher is unaffected
        assert scheduler.route(request(PROMPT_A, scheduler)).decode.worker_id == "d-0"
    finally:
        started = time.monotonic()
        scheduler.stop(timeout_s=5.0)
        assert time.monotonic() - started < 3.0
        dead.close()


def test_blocking_reads_need_a_longer_socket_timeout(redis_server: EmbeddedRedis, state: ClusterState):
    short = redis_server.client(socket_timeout=0.5)
    try:
        with pytest.raises(ValueError, match=r"socket_timeout \(0.5 s\) must be >= 1.1 s"):
            Scheduler(ClusterState(short, cluster="test"), CONFIG)
        with pytest.raises(ValueError, match="use one cluster name for both"):
            Scheduler(state, CONFIG, events_state=ClusterState(short, cluster="other"))
    finally:
        short.close()
