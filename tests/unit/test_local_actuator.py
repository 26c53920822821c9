"""The `local` actuator: targets recorded from any thread, applied by the cluster's owner."""

from __future__ import annotations

import pytest

from tandem.autoscaler.local import LocalActuator
from tandem.common.workers import WorkerRole

P, D = WorkerRole.PREFILL, WorkerRole.DECODE


class FakeCluster:
    """The pool-change surface of `LocalCluster`, recording calls."""

    def __init__(self, prefill: int, decode: int) -> None:
        self.pools = {P: [f"prefill-{i}" for i in range(prefill)], D: [f"decode-{i}" for i in range(decode)]}
        self.next = {P: prefill, D: decode}
        self.retiring: list[str] = []
        self.exited: list[str] = []

    def pool_size(self, role: WorkerRole) -> int:
        return len(self.pools[role])

    def add_worker(self, role: WorkerRole) -> str:
        name = f"{role.value}-{self.next[role]}"
        self.next[role] += 1
        self.pools[role].append(name)
        return name

    def retire_worker(self, role: WorkerRole) -> str | None:
        if not self.pools[role]:
            return None
        name = self.pools[role].pop()
        self.retiring.append(name)
        return name

    def reap_retired(self) -> list[str]:
        gone, self.exited = self.exited, []
        return [f"{name} (exit code 0)" for name in gone]


def test_scale_records_targets_and_apply_makes_them() -> None:
    actuator = LocalActuator({P: 1, D: 1})
    cluster = FakeCluster(1, 1)
    assert (actuator.replicas(P), actuator.replicas(D)) == (1, 1)
    assert actuator.apply(cluster) == []

    actuator.scale(D, 3)
    assert actuator.replicas(D) == 3
    assert cluster.pool_size(D) == 1  # nothing happens until the owner applies
    assert actuator.apply(cluster) == ["started decode-1", "started decode-2"]
    assert cluster.pools[D] == ["decode-0", "decode-1", "decode-2"]

    actuator.scale(D, 1)
    actuator.scale(P, 2)
    assert actuator.apply(cluster) == ["started prefill-1", "retiring decode-2", "retiring decode-1"]
    assert cluster.retiring == ["decode-2", "decode-1"]
    cluster.exited = ["decode-2"]
    assert actuator.apply(cluster) == ["exited decode-2 (exit code 0)"]
    assert (actuator.replicas(P), actuator.replicas(D)) == (2, 1)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_replicas_are_refused(bad: object) -> None:
    actuator = LocalActuator({P: 1, D: 1})
    with pytest.raises(ValueError, match="replicas must be an int >= 0"):
        actuator.scale(D, bad)  # type: ignore[arg-type]
    assert actuator.replicas(D) == 1
    with pytest.raises(ValueError, match="initial replicas of decode"):
        LocalActuator({D: -1})
