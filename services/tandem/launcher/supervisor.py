"""The supervisor of `tandem up`: restarts the children of a `LocalCluster` that die.

Lifecycle (all on the thread that runs the cluster, `up.py`'s wait loop):
1. `Supervisor(cluster, policy)` once the cluster is up.
2. `poll()` on every turn of the wait loop:
   - each child that exited on its own and has no restart pending gets a decision from its
     `RestartTracker` (`restarts.py`), said in one log line:
     `decode-0 exited with status -9 (SIGKILL); restarting in 1.0 s (restart 1 of 5)`;
   - each pending restart that is due runs (`LocalCluster.restart`), and says so;
   - a child past its restart limit raises `RestartLimitReached` (with the child's last
     output): `tandem up` then stops the cluster and exits 1 (see `restarts.py` for why).
   It returns True when a child was replaced, or a replacement printed its ready line (its
   address and metrics port are known then): the caller rewrites its state file.
A restart that fails to start (Redis on a port that someone took) counts as one more death
of that child. Retiring workers (the autoscaler's scale-down) are never restarted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from tandem.common.embedded_redis import EmbeddedRedisError
from tandem.launcher.placement import WorkerProcess
from tandem.launcher.ready import ChildStartError
from tandem.launcher.restarts import RestartPolicy, RestartTracker, exit_status

logger = logging.getLogger(__name__)


class RestartLimitReached(RuntimeError):
    """A child died more often than `RestartPolicy.max_restarts` within the window."""


class Supervised(Protocol):
    """What the supervisor needs of a cluster (`LocalCluster` is one)."""

    def exited(self) -> Sequence[WorkerProcess]: ...

    def restart(self, name: str) -> WorkerProcess: ...


class Supervisor:
    """Restarts `cluster`'s children with backoff; see the module doc. Not thread-safe."""

    def __init__(self, cluster: Supervised, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._cluster, self._policy, self._clock = cluster, policy, clock
        self._trackers: dict[str, RestartTracker] = {}
        self._due: dict[str, float] = {}  # child name -> clock time of its pending restart
        self._starting: dict[str, WorkerProcess] = {}  # restarted, not yet ready
        self._restarts = 0

    @property
    def num_restarts(self) -> int:
        """Children restarted so far (started again, whether or not they got ready)."""
        return self._restarts

    def poll(self) -> bool:
        """Decide about new deaths, run the restarts that are due; True if a child was replaced."""
        now_s = self._clock()
        for child in self._cluster.exited():
            if child.name not in self._due:
                self._on_exit(child.name, exit_status(child.returncode), child.output_tail(), now_s)
        replaced = False
        for name, child in list(self._starting.items()):
            if child.ready is not None or not child.is_running:
                del self._starting[name]
                replaced = replaced or child.ready is not None
        for name, due_s in list(self._due.items()):
            if due_s > now_s:
                continue
            del self._due[name]
            try:
                child = self._cluster.restart(name)
            except (ChildStartError, EmbeddedRedisError) as exc:
                self._on_exit(name, "a failed restart", str(exc), self._clock())
                continue
            self._restarts += 1
            replaced = True
            if child.ready is None:
                self._starting[name] = child
            logger.warning("%s restarted (pid %d)", name, child.pid)
        return replaced

    def _on_exit(self, name: str, status: str, tail: str, now_s: float) -> None:
        decision = self._trackers.setdefault(name, RestartTracker(self._policy)).on_exit(now_s)
        if decision.delay_s is None:
            raise RestartLimitReached(
                f"{name} exited with {status} after {decision.limit} restart(s) within "
                f"{self._policy.window_s:g} s; its last output:\n{tail}"
            )
        self._due[name] = now_s + decision.delay_s
        logger.warning(
            "%s exited with %s; restarting in %.1f s (restart %d of %d)",
            name,
            status,
            decision.delay_s,
            decision.attempt,
            decision.limit,
        )
