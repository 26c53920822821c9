"""The `ray` actuator: the autoscaler's replica counts applied to the worker actors of a
`tandem up --ray` (`services/tandem/launcher/ray_cluster.py`).

- `replicas(role)` counts the pool's actors whose worker runs or starts (Ray may still be
  placing them); workers that drain or exited are not counted.
- `scale(role, n)` returns promptly. Up: it asks Ray for new worker actors (`decode-3`, ...;
  an id is never reused) and does not wait for them: the gateway routes to a worker once it
  registered in Redis. Down: it picks the newest workers of the pool and calls their actor's
  `stop()` without waiting for it: each worker takes no new work, finishes its sequences,
  releases its leases and leaves Redis before it exits. The actor is killed once that call
  returned, at the next `replicas` or `scale` (or when the cluster closes).
- `close()` releases nothing of the workers: the cluster's owner stops them.

Threads: any thread may call it (Ray's API is thread-safe and `RayCluster` locks its registry),
so unlike the `local` actuator it needs no hand-off to the cluster's owner thread.
"""

from __future__ import annotations

import logging
from typing import Protocol

from tandem.common.workers import WorkerRole

logger = logging.getLogger(__name__)


class ActorPools(Protocol):
    """The pools of worker actors that the actuator resizes; `tandem up --ray`'s `RayCluster` is
    one (the launcher is the higher layer: it imports this package, never the other way round).
    Thread-safe: any thread may call it."""

    def replicas(self, role: WorkerRole) -> int:
        """Workers of `role` that run or start; draining and exited ones are not counted."""
        ...

    def add_worker(self, role: WorkerRole) -> str:
        """One more worker of `role` (not waited for); its id."""
        ...

    def retire_newest(self, role: WorkerRole) -> str | None:
        """Start draining the newest worker of `role`; its id, or None if the pool is empty."""
        ...

    def reap(self) -> list[str]:
        """Remove the workers whose drain is over; `name (exit code N)` of each."""
        ...


class RayActuator:
    name = "ray"

    def __init__(self, cluster: ActorPools) -> None:
        """`cluster`: an open `RayCluster`; the actuator does not own it."""
        self._cluster = cluster

    def replicas(self, role: WorkerRole) -> int:
        self._reap()
        return self._cluster.replicas(role)

    def scale(self, role: WorkerRole, replicas: int) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be an int >= 0, got {replicas!r}")
        self._reap()
        current = self._cluster.replicas(role)
        for _ in range(current, replicas):
            logger.info("ray actuator: started %s", self._cluster.add_worker(role))
        for _ in range(replicas, current):
            retired = self._cluster.retire_newest(role)
            if retired is None:
                break
            logger.info("ray actuator: retiring %s", retired)

    def close(self) -> None:
        """Nothing of its own to release: the cluster's owner stops the workers."""

    def _reap(self) -> None:
        for line in self._cluster.reap():
            logger.info("ray actuator: exited %s", line)
