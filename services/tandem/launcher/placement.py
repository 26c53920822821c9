"""Where a `LocalCluster` runs its workers: the interface, and the default (local processes).

`LocalCluster` owns the order of a cluster's life (Redis, workers, gateway; then the reverse)
and asks a `WorkerPlacement` for the workers themselves:

1. `open(model_dir, secrets, timeout_s, cancelled)` once, after Redis is up and before any
   worker (a Ray placement connects to Ray here, or starts a head node). `secrets` (the Redis
   URL, the cluster token) go into every worker's environment, never its command line.
2. `spawn(role, worker_id)` once per worker; it returns at once with a `WorkerProcess` that
   is still starting (its ready line arrives later, through `check_ready()`).
3. `close()` once, after `LocalCluster` stopped every worker it spawned and before Redis stops.
   It stops whatever the placement still runs (workers an autoscaler added, a Ray head).

`ProcessPlacement` is the plain `tandem up`: every worker is a `ChildProcess` of ours.
`services/tandem/launcher/ray_cluster.py` is the other one (`tandem up --ray`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

from tandem.common.workers import WorkerRole
from tandem.launcher.config import ChildSecrets, LocalClusterConfig
from tandem.launcher.processes import ChildProcess


class WorkerProcess(Protocol):
    """One worker as `LocalCluster` watches it, wherever it runs. `ChildProcess` is one.

    `check_ready()` is non-blocking: the worker's JSON ready line once it printed it, None
    while it starts, `ChildStartError` if it ended first. `terminate()` starts the drain and
    returns at once; `stop(timeout_s)` drains, kills after the bound, and returns the exit code.
    """

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int: ...

    @property
    def ready(self) -> dict[str, Any] | None: ...

    @property
    def is_running(self) -> bool: ...

    @property
    def returncode(self) -> int | None: ...

    def check_ready(self) -> dict[str, Any] | None: ...

    def output_tail(self) -> str: ...

    def terminate(self) -> None: ...

    def stop(self, timeout_s: float) -> int: ...


class WorkerPlacement(Protocol):
    """Runs the workers of one `LocalCluster`; see the module doc for the call order. Called
    from the cluster's thread; an implementation that an autoscaler also drives locks itself."""

    def open(self, model_dir: Path, secrets: ChildSecrets, timeout_s: float, cancelled: Callable[[], bool]) -> None:
        """Get ready to spawn workers (bounded by `timeout_s`)."""
        ...

    def spawn(self, role: WorkerRole, worker_id: str) -> WorkerProcess:
        """Start one worker; returns without waiting for it to be ready."""
        ...

    def close(self) -> None:
        """Stop what the placement still runs. Idempotent."""
        ...


class ProcessPlacement:
    """Workers as child processes of this process, with the host's cores divided among them.

    `num_threads` overrides that division; `cpus` (worker id -> core) pins workers with
    `taskset -c`, from their first instruction, so that every thread they start stays there
    (the benchmark set does; `tandem up` does not pin)."""

    def __init__(
        self,
        config: LocalClusterConfig,
        sink: IO[str] | None = None,
        num_threads: int | None = None,
        cpus: Mapping[str, int] | None = None,
    ) -> None:
        self._config = config
        self._sink = sink
        self._num_threads = num_threads
        self._cpus = dict(cpus or {})
        self._target: tuple[Path, ChildSecrets] | None = None

    def open(self, model_dir: Path, secrets: ChildSecrets, timeout_s: float, cancelled: Callable[[], bool]) -> None:
        self._target = (model_dir, secrets)

    def spawn(self, role: WorkerRole, worker_id: str) -> ChildProcess:
        if self._target is None:
            raise RuntimeError("ProcessPlacement.spawn() before open()")
        model_dir, secrets = self._target
        num_threads = self._num_threads or self._config.threads_per_worker(os.cpu_count())
        argv = self._config.worker_argv(role, worker_id, model_dir, secrets.redis_url, num_threads)
        if worker_id in self._cpus:
            argv = pinned(self._cpus[worker_id], argv)
        return ChildProcess.spawn(worker_id, argv, env=secrets.environ(os.environ), sink=self._sink)

    def close(self) -> None:
        """Nothing of its own: `LocalCluster` stops every worker this placement spawned."""


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """`argv` run under `taskset -c cpu` (unpinned if taskset is missing: a stated limitation)."""
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu), *argv] if taskset else argv
