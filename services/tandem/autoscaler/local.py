"""The `local` actuator: the autoscaler's replica counts applied to a `tandem up` cluster.

Threads: the autoscaler loop calls `replicas` and `scale` from its own thread, but only the
thread that owns the `LocalCluster` (a `ProcessPools`) may spawn workers (PR_SET_PDEATHSIG is tied to the
spawning thread, see `services/tandem/launcher/processes.py`). So `scale` only records the target
under a lock, and the owner thread calls `apply(cluster)` from its wait loop: it spawns
workers up to the target, or retires the newest ones (SIGTERM, which drains them: they leave
Redis, finish their sequences, release their leases, then exit), and reaps retired workers.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from tandem.common.workers import WorkerRole

logger = logging.getLogger(__name__)


class ProcessPools(Protocol):
    """The pools of worker processes that `apply` resizes; `tandem up`'s `LocalCluster` is one
    (the launcher is the higher layer: it imports this package, never the other way round).
    Every method is called from the thread that owns the processes."""

    def pool_size(self, role: WorkerRole) -> int:
        """Workers of `role` that serve or are starting (retiring ones are not counted)."""
        ...

    def add_worker(self, role: WorkerRole) -> str:
        """Spawn one more worker of `role` (not waited for); its worker id."""
        ...

    def retire_worker(self, role: WorkerRole) -> str | None:
        """Start draining the newest worker of `role`; its id, or None if the pool is empty."""
        ...

    def reap_retired(self) -> list[str]:
        """Forget the retired workers that exited; `name (exit code N)` of each."""
        ...


class LocalActuator:
    name = "local"

    def __init__(self, initial: dict[WorkerRole, int]) -> None:
        """`initial`: the pool sizes the cluster starts with."""
        for role, count in initial.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"initial replicas of {role.value} must be an int >= 0, got {count!r}")
        self._lock = threading.Lock()
        self._targets = dict(initial)

    def replicas(self, role: WorkerRole) -> int:
        """The pool's target: what `apply` has made (or is about to make) it."""
        with self._lock:
            return self._targets.get(role, 0)

    def scale(self, role: WorkerRole, replicas: int) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be an int >= 0, got {replicas!r}")
        with self._lock:
            self._targets[role] = replicas

    def close(self) -> None:
        """Nothing of its own to release: the cluster's owner stops the workers."""

    def apply(self, cluster: ProcessPools) -> list[str]:
        """Owner thread: bring every pool to its target; returns what changed, one line each
        (`started decode-2`, `retiring decode-2`, `exited decode-2 (exit code 0)`)."""
        with self._lock:
            targets = dict(self._targets)
        changes = [f"exited {line}" for line in cluster.reap_retired()]
        for role, target in targets.items():
            while cluster.pool_size(role) < target:
                changes.append(f"started {cluster.add_worker(role)}")
            while cluster.pool_size(role) > target:
                retired = cluster.retire_worker(role)
                if retired is None:
                    break
                changes.append(f"retiring {retired}")
        for line in changes:
            logger.info("local actuator: %s", line)
        return changes
