"""A Tandem worker as a Ray actor: the actor class, and the handle the launcher holds.

The actor does not run the engine itself: it runs the ordinary worker process (`tandem prefill`
or `tandem decode`, the command line `LocalClusterConfig.worker_argv` builds) as its
`ChildProcess`, so a worker under Ray is exactly the worker of `tandem up`: same flags, same
JSON ready line, same SIGTERM drain. Ray places the actor (one GPU, or `cpus_per_worker` CPUs);
the actor binds the worker to its node's IP and gives it as many torch threads as Ray gave it
CPUs. The worker's output goes to the actor's stderr, which Ray forwards to the driver.

Lifecycle of one worker (driver side, `RayWorker`):
1. `RayWorker.create()` asks Ray for the actor and returns at once. Its constructor (on the
   node) spawns the worker process. `wait_exit()` is called at once and stays in flight until
   the worker process exits: `is_running` is "that call has not returned".
2. `check_ready()` polls the actor's `ready()` (each call waits at most READY_WAIT_S on the
   node) until the worker printed its ready line; a worker that exited first raises
   `ChildStartError` with its last output.
3. `terminate()` calls the actor's `stop()` and returns at once: the worker drains (takes no new
   work, finishes its sequences, releases its leases, leaves Redis), SIGKILL after the bound.
   `stop(timeout_s)` also waits for that call, bounded, and then kills the actor (`ray.kill`);
   an actor Ray has not placed within PLACE_WAIT_S has nothing to drain and is killed at once.

The actor is threaded (`max_concurrency`): `wait_exit`, `ready` and `stop` run side by side.
Only strings, numbers and frozen configs cross Ray (Ray serialises them; the `ChildSecrets`, the
Redis URL and the cluster token, go into the worker's environment on its node, never into its
command line); no KV and no request ever goes through Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayError

from tandem.common.workers import WorkerRole
from tandem.launcher.config import ChildSecrets, LocalClusterConfig
from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import ChildStartError

logger = logging.getLogger(__name__)

READY_WAIT_S = 0.5  # how long one `ready()` call waits on the node
EXIT_POLL_S = 0.2
ACTOR_CONCURRENCY = 4  # wait_exit + ready + stop + one spare
PLACE_WAIT_S = 5.0  # at stop: a worker whose actor Ray has not placed by then is just removed
RPC_MARGIN_S = 10.0  # on top of a bound enforced on the node: Ray's own round trip
TAIL_TIMEOUT_S = 5.0
KILLED = -int(signal.SIGKILL)  # the exit code reported for a worker whose actor died


class WorkerActor:
    """Runs on a Ray node, owns one worker process. Methods are called by `RayWorker`."""

    def __init__(
        self, config: LocalClusterConfig, role: str, worker_id: str, model_dir: str, secrets: ChildSecrets
    ) -> None:
        host = ray.util.get_node_ip_address()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        num_threads = max(1, int(cpus))
        argv = config.worker_argv(
            WorkerRole(role), worker_id, Path(model_dir), secrets.redis_url, num_threads, host=host
        )
        # Ray runs an actor's constructor on its process's main thread, which lives as long as
        # the actor: the worker's PR_SET_PDEATHSIG (processes.py) fires only if the actor dies.
        self._child = ChildProcess.spawn(worker_id, argv, env=secrets.environ(os.environ))
        self._stop_lock = threading.Lock()  # one SIGTERM: a second could cut the drain short

    def pid(self) -> int:
        """The worker process's pid on this node."""
        return self._child.pid

    def ready(self, timeout_s: float) -> dict[str, Any] | None:
        """The worker's ready line, waiting at most `timeout_s`; None if it is still starting.
        Raises `ChildStartError` (with its last output) if it exited without one."""
        deadline = time.monotonic() + timeout_s
        while (ready := self._child.check_ready()) is None and time.monotonic() < deadline:
            time.sleep(min(EXIT_POLL_S, timeout_s))
        return ready

    def address(self) -> str | None:
        """The worker's gRPC address (`ip:port`), once it is ready."""
        ready = self._child.ready
        return None if ready is None else ready.get("address")

    def wait_exit(self) -> int:
        """Block until the worker process exits; its exit code."""
        while (code := self._child.returncode) is None:
            time.sleep(EXIT_POLL_S)
        return code

    def stop(self, timeout_s: float) -> int:
        """Drain: SIGTERM, wait up to `timeout_s`, then SIGKILL. The exit code."""
        with self._stop_lock:
            return self._child.stop(timeout_s)

    def output_tail(self) -> str:
        return self._child.output_tail()


_REMOTE_WORKER_ACTOR = ray.remote(WorkerActor)


class RayWorker:
    """The driver's handle on one worker actor; a `WorkerProcess` (see `placement.py`).
    `LocalCluster`'s thread and an autoscaler's may both hold it: `terminate()` is locked
    (one `stop()` call per actor), everything else only reads or caches what Ray returned."""

    def __init__(
        self, name: str, role: WorkerRole, actor: ActorHandle, resources: dict[str, float], stop_timeout_s: float
    ) -> None:
        """Wrap a just-created actor. Use `create()`."""
        self._name = name
        self._role = role
        self._actor = actor
        self._resources = resources
        self._stop_timeout_s = stop_timeout_s
        self._pid_ref: ray.ObjectRef = actor.pid.remote()
        self._exit_ref: ray.ObjectRef = actor.wait_exit.remote()
        self._ready_ref: ray.ObjectRef | None = None
        self._stop_ref: ray.ObjectRef | None = None
        self._ready: dict[str, Any] | None = None
        self._pid: int = 0
        self._killed: bool = False
        self._lock: threading.Lock = threading.Lock()

    @classmethod
    def create(
        cls,
        config: LocalClusterConfig,
        role: WorkerRole,
        worker_id: str,
        model_dir: Path,
        secrets: ChildSecrets,
        resources: dict[str, float],
        stop_timeout_s: float,
    ) -> RayWorker:
        """Ask Ray for the actor (`resources`: `num_cpus` / `num_gpus`); returns at once."""
        actor: ActorHandle = _REMOTE_WORKER_ACTOR.options(  # type: ignore[assignment]  # Ray types it loosely
            max_concurrency=ACTOR_CONCURRENCY, **resources
        ).remote(config, role.value, worker_id, str(model_dir), secrets)
        logger.info("asked Ray for %s (%s)", worker_id, ", ".join(f"{k}={v}" for k, v in resources.items()))
        return cls(worker_id, role, actor, resources, stop_timeout_s)

    # ---- state ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def role(self) -> WorkerRole:
        return self._role

    @property
    def pid(self) -> int:
        """The worker process's pid on its node; 0 until Ray has placed the actor."""
        if not self._pid and _done(self._pid_ref):
            try:
                self._pid = int(ray.get(self._pid_ref))
            except RayError:
                pass
        return self._pid

    @property
    def ready(self) -> dict[str, Any] | None:
        return self._ready

    @property
    def is_running(self) -> bool:
        """Until the worker process exited (or its actor died)."""
        return not _done(self._exit_ref)

    @property
    def returncode(self) -> int | None:
        """The worker's exit code once it exited; KILLED if its actor died under it."""
        if not _done(self._exit_ref):
            return None
        try:
            return int(ray.get(self._exit_ref))
        except RayError:
            return KILLED

    @property
    def terminating(self) -> bool:
        """`terminate()` was called: the worker drains, or is gone."""
        return self._stop_ref is not None

    @property
    def removed(self) -> bool:
        """`stop()` has killed the actor: nothing is left of this worker."""
        return self._killed

    @property
    def stopped(self) -> bool:
        """The actor's `stop()` returned (or failed): the worker process is gone."""
        return self._stop_ref is not None and _done(self._stop_ref)

    def output_tail(self) -> str:
        if not self.pid:
            return (
                f"<Ray has not placed the actor yet: no node has {self._resources} free "
                f"(--ray-cpus-per-worker, or the cluster's size)>"
            )
        try:
            return str(ray.get(self._actor.output_tail.remote(), timeout=TAIL_TIMEOUT_S))
        except (GetTimeoutError, RayError) as exc:
            return f"<no output: the actor did not answer: {type(exc).__name__}>"

    # ---- waiting -------------------------------------------------------------------------
    def check_ready(self) -> dict[str, Any] | None:
        """Non-blocking: the ready line once it arrived, None while the worker starts (or Ray
        has not placed it yet); `ChildStartError` if it exited without one."""
        if self._ready is not None:
            return self._ready
        if self._ready_ref is None:
            self._ready_ref = self._actor.ready.remote(READY_WAIT_S)
        if not _done(self._ready_ref):
            return None
        ref, self._ready_ref = self._ready_ref, None
        try:
            self._ready = ray.get(ref)
        except RayError as exc:
            raise ChildStartError(f"{self._name} (Ray actor) ended before it was ready: {exc}") from None
        return self._ready

    # ---- stopping ------------------------------------------------------------------------
    def terminate(self) -> None:
        """Start the drain (the actor's `stop()`); returns at once. Idempotent."""
        with self._lock:
            if self._stop_ref is None and not self._killed:
                self._stop_ref = self._actor.stop.remote(self._stop_timeout_s)

    def stop(self, timeout_s: float) -> int:
        """Drain (bounded on the node by `stop_timeout_s`), wait for it at most about
        2 * `timeout_s`, then kill the actor. The worker's exit code. Idempotent."""
        self.terminate()
        code = KILLED
        placed = bool(ray.wait([self._pid_ref], timeout=PLACE_WAIT_S)[0])  # else nothing to drain
        if self._stop_ref is not None and placed:
            try:
                code = int(ray.get(self._stop_ref, timeout=2 * max(timeout_s, 0.0) + RPC_MARGIN_S))
            except GetTimeoutError:
                logger.warning("%s: the actor's stop did not return in time; killing the actor", self._name)
            except RayError as exc:
                logger.warning("%s: the actor failed while stopping (%s); killing it", self._name, exc)
        with self._lock:
            if not self._killed:
                self._killed = True
                ray.kill(self._actor, no_restart=True)
        return code


def _done(ref: ray.ObjectRef) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)
