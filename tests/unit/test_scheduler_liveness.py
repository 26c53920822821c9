"""Bounded staleness of the registry view through a Redis outage (`registry.Liveness`), as a
timeline: which workers each snapshot holds (grace 10 s, recovery window 2 s)."""

from __future__ import annotations

from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler.registry import EMPTY_SNAPSHOT, Liveness, RegistrySnapshot

D0 = WorkerInfo("d-0", WorkerRole.DECODE, "127.0.0.1:7000", "ab12", 64, "t")
D1 = WorkerInfo("d-1", WorkerRole.DECODE, "127.0.0.1:7001", "ab12", 64, "t")
P0 = WorkerInfo("p-0", WorkerRole.PREFILL, "127.0.0.1:7002", "ab12", 64, "t")
LOAD = WorkerLoad(1, 2, 3, 4, 64, 0.0)


def read(live: Liveness, previous: RegistrySnapshot, workers: list[WorkerInfo], now_s: float) -> RegistrySnapshot:
    loads: dict[str, WorkerLoad | None] = {w.worker_id: LOAD for w in workers}
    live.read(loads, now_s)
    snapshot = live.after_read(previous, workers, loads, now_s)
    live.retain(snapshot.worker_ids)
    return snapshot


def test_outage_keeps_the_view_until_the_grace_then_drops_stale_workers() -> None:
    live = Liveness(stale_grace_s=10.0, recovery_window_s=2.0)
    snapshot = read(live, EMPTY_SNAPSHOT, [D0, D1, P0], 0.0)
    snapshot = read(live, snapshot, [D0, P0], 1.0)  # d-1 left with Redis up: gone at once
    assert snapshot.worker_ids == ("d-0", "p-0") and not live.in_outage
    live.failed(2.0)
    assert live.in_outage
    kept, stale = live.without_stale(snapshot, 11.0)  # 10 s since d-0 and p-0 were confirmed
    assert kept is snapshot and stale == []
    kept, stale = live.without_stale(snapshot, 11.5)
    assert kept.worker_ids == () and stale == ["d-0", "p-0"]
    assert kept.taken_at_s == snapshot.taken_at_s


def test_after_an_outage_missing_workers_are_kept_for_the_recovery_window() -> None:
    live = Liveness(stale_grace_s=10.0, recovery_window_s=2.0)
    snapshot = read(live, EMPTY_SNAPSHOT, [D0, D1, P0], 0.0)
    live.failed(1.0)
    # Redis answers at 5 s, empty (restarted, or every key expired in a freeze)
    after = read(live, snapshot, [], 5.0)
    assert after.worker_ids == ("d-0", "d-1", "p-0")
    assert after.decode[0].load == LOAD and after.taken_at_s == 5.0
    after = read(live, after, [D0], 6.0)  # d-0 registered again; the others are still kept
    assert after.worker_ids == ("d-0", "d-1", "p-0")
    after = read(live, after, [D0], 7.5)  # the window (2 s from 5 s) is over
    assert after.worker_ids == ("d-0",)


def test_recovery_keeps_no_worker_past_its_grace() -> None:
    live = Liveness(stale_grace_s=10.0, recovery_window_s=5.0)
    snapshot = read(live, EMPTY_SNAPSHOT, [D0], 0.0)
    live.failed(1.0)
    assert read(live, snapshot, [], 9.0).worker_ids == ("d-0",)
    live.failed(9.5)
    assert read(live, snapshot, [], 10.5).worker_ids == ()  # confirmed 10.5 s ago
