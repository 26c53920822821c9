"""`read_signals` against a real redis-server: exact per-pool totals from published loads, and
freshness (a stale, absent or unreadable load marks the pool)."""

from __future__ import annotations

from tandem.autoscaler.signals import PoolSignals, SignalStatus, read_signals
from tandem.common.cluster_state import ClusterState
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole

P, D = WorkerRole.PREFILL, WorkerRole.DECODE
NOW_S = 1_700_000_000.0
MAX_AGE_S = 15.0
TTL_S = 60.0


def add_worker(state: ClusterState, worker_id: str, load: WorkerLoad | None) -> None:
    role = P if worker_id.startswith("p") else D
    state.register(WorkerInfo(worker_id, role, f"{worker_id}:7000", "ab12", 1024, "t"), ttl_s=TTL_S)
    if load is not None:
        state.publish_load(worker_id, load, ttl_s=TTL_S)


def load(
    queued: int = 0, waiting: int = 0, running: int = 0, used: int = 0, total: int = 100, age_s: float = 1.0
) -> WorkerLoad:
    return WorkerLoad(waiting, running, queued, used, total, NOW_S - age_s)


def test_totals_per_pool(redis_client):
    state = ClusterState(redis_client, "sig")
    add_worker(state, "p-0", load(queued=100, waiting=1, running=2, used=10))
    add_worker(state, "p-1", load(queued=250, running=1, used=5))
    add_worker(state, "d-0", load(waiting=3, running=4, used=30, total=200))
    add_worker(state, "d-1", load(waiting=2, running=6, used=50, total=200, age_s=MAX_AGE_S))  # at the limit
    ClusterState(redis_client, "other").register(  # another cluster's worker is not counted
        WorkerInfo("d-9", D, "d-9:7000", "ab12", 1024, "t"), ttl_s=TTL_S
    )
    state.publish_load("d-gone", load(waiting=50), ttl_s=TTL_S)  # a load without a live worker

    signals = read_signals(state, NOW_S, MAX_AGE_S)

    assert signals == {
        P: PoolSignals(
            P,
            SignalStatus.FRESH,
            num_workers=2,
            queued_prefill_tokens=350,
            waiting=1,
            running=3,
            kv_blocks_used=15,
            kv_blocks_total=200,
        ),
        D: PoolSignals(
            D,
            SignalStatus.FRESH,
            num_workers=2,
            queued_prefill_tokens=0,
            waiting=5,
            running=10,
            kv_blocks_used=80,
            kv_blocks_total=400,
        ),
    }
    assert signals[D].kv_usage == 0.2


def test_a_stale_load_marks_only_its_pool(redis_client):
    state = ClusterState(redis_client, "sig")
    add_worker(state, "p-0", load(queued=100))
    add_worker(state, "d-0", load(waiting=3, used=30))
    add_worker(state, "d-1", load(waiting=2, used=10, age_s=MAX_AGE_S + 0.5))

    signals = read_signals(state, NOW_S, MAX_AGE_S)

    assert signals[P].status is SignalStatus.FRESH
    assert signals[D] == PoolSignals(
        D, SignalStatus.STALE, num_workers=2, waiting=5, kv_blocks_used=40, kv_blocks_total=200
    )


def test_a_live_worker_without_a_load_marks_its_pool_stale(redis_client):
    state = ClusterState(redis_client, "sig")
    add_worker(state, "p-0", load(queued=700))
    add_worker(state, "p-1", None)  # registered, has not published a load yet

    signals = read_signals(state, NOW_S, MAX_AGE_S)

    assert signals[P] == PoolSignals(
        P, SignalStatus.STALE, num_workers=2, queued_prefill_tokens=700, kv_blocks_total=100
    )
    assert signals[D] == PoolSignals(D, SignalStatus.FRESH)  # no live decode worker: fresh zeros


def test_a_load_from_the_future_counts_as_fresh(redis_client):
    state = ClusterState(redis_client, "sig")
    add_worker(state, "d-0", load(waiting=1, age_s=-30.0))  # the worker's clock runs ahead
    assert read_signals(state, NOW_S, MAX_AGE_S)[D].status is SignalStatus.FRESH


def test_unreachable_redis_gives_missing_signals_without_raising(unreachable_redis_client, caplog):
    signals = read_signals(ClusterState(unreachable_redis_client, "sig"), NOW_S, MAX_AGE_S)
    assert signals == {P: PoolSignals(P, SignalStatus.MISSING), D: PoolSignals(D, SignalStatus.MISSING)}
    assert [r.getMessage().split(";")[0] for r in caplog.records] == ["cannot read worker loads from Redis"]
