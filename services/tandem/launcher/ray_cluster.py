"""`tandem up --ray`: the workers of a `LocalCluster` as Ray actors.

`RayCluster` is the cluster's `WorkerPlacement` (see `placement.py`); Redis and the gateway stay
local children of `tandem up`, exactly as without `--ray`. It is also the registry of the
worker actors that the `ray` autoscaler actuator (`services/tandem/autoscaler/ray.py`) grows and
shrinks.

Lifecycle:
1. `open()` (from `LocalCluster.start`, once Redis and the gateway are spawned: no fork after
   a Ray Client connection's gRPC threads exist): with no address, starts a private head
   (`RayHead`: `ray start --head --block`, ports outside 10002-19999, a temp dir), sets the
   auth variables (`ray_auth.py`) in our environment, and connects (`ray.init`) to that head
   or to `RayConfig.address` (`host:port` of a GCS, or `ray://host:port` of a Ray Client
   server). `ray.init` takes SIGTERM over; the previous handlers are put back at once.
   Each worker will ask Ray for one GPU if the cluster has any, else `cpus_per_worker` CPUs.
2. `spawn(role, worker_id)` / `add_worker(role)` create a `RayWorker` actor (not waited for).
   `retire_newest(role)` starts the drain of the newest worker of a pool without waiting;
   `reap()` kills the actors whose drain has finished.
3. `close()` (from `LocalCluster.stop`, after the workers it spawned stopped and before Redis):
   drains and kills every actor still alive (the ones an autoscaler added), disconnects, stops
   the private head by its pid, and puts our environment back. Idempotent.

Threads: `LocalCluster` calls it from its thread and an autoscaler from its own; one lock
guards the registry. Workers on other nodes must reach Redis (`--redis-url`, not the private
loopback one) and find the model at the same path.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import ray
from ray.exceptions import RayError

from tandem.common.redis_url import redact
from tandem.common.workers import WorkerRole
from tandem.launcher.config import ChildSecrets, LocalClusterConfig
from tandem.launcher.local import WORKER_STOP_GRACE_S
from tandem.launcher.ray_actors import RayWorker
from tandem.launcher.ray_auth import patch_environ, write_token_file
from tandem.launcher.ray_config import RayConfig
from tandem.launcher.ray_head import RayHead, make_temp_dir
from tandem.launcher.ready import ChildStartError

logger = logging.getLogger(__name__)

NAMESPACE = "tandem"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RayCluster:
    """Ray connection, private head (if any) and worker actors of one `tandem up --ray`."""

    def __init__(self, config: LocalClusterConfig, ray_config: RayConfig, sink: IO[str] | None = None) -> None:
        """Nothing happens until `open()`. The private head's output goes to `sink` on errors."""
        self._config = config
        self._ray_config = ray_config
        self._sink = sink
        self._lock = threading.Lock()
        self._workers: list[RayWorker] = []  # every actor not killed yet, oldest first
        self._next_index = {role: 0 for role in WorkerRole}
        self._target: tuple[Path, ChildSecrets] | None = None
        self._resources: dict[str, float] = {}
        self._head: RayHead | None = None
        self._saved_environ: dict[str, str | None] | None = None
        self._connected = False
        self._address: str | None = None

    @property
    def address(self) -> str:
        """The address of the Ray cluster the workers run on."""
        if self._address is None:
            raise RuntimeError("RayCluster is not open")
        return self._address

    # ---- WorkerPlacement -----------------------------------------------------------------
    def open(self, model_dir: Path, secrets: ChildSecrets, timeout_s: float, cancelled: Callable[[], bool]) -> None:
        """Start the private head or not, set the auth variables, connect; see the module doc."""
        ray_config, auth = self._ray_config, self._ray_config.auth
        own_head = ray_config.own_head
        temp_dir = make_temp_dir() if own_head else None
        try:
            new_token = write_token_file(temp_dir) if temp_dir is not None and auth.needs_new_token(True) else None
            self._saved_environ = patch_environ(os.environ, auth.environ(own_head, new_token))
            _reload_ray_auth()
            if temp_dir is not None:
                self._head = RayHead.start(
                    temp_dir,
                    os.environ,
                    self._head_num_cpus(),
                    min(timeout_s, ray_config.head_start_timeout_s),
                    cancelled,
                    self._sink,
                )
        except BaseException:
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)  # the head owns it only once it runs
            raise
        self._address = self._head.address if self._head is not None else ray_config.address
        self._connect(self.address, auth.uses_token(own_head))
        has_gpu = ray.cluster_resources().get("GPU", 0.0) >= 1.0
        self._resources = {"num_gpus": 1.0} if has_gpu else {"num_cpus": float(ray_config.cpus_per_worker)}
        self._target = (model_dir, secrets)
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        if nodes > 1 and urlsplit(secrets.redis_url).hostname in LOOPBACK_HOSTS:
            logger.warning(
                "the Ray cluster has %d nodes but Redis (%s) listens on loopback only: workers on "
                "other nodes cannot reach it; pass --redis-url with an address every node reaches",
                nodes,
                redact(secrets.redis_url),
            )
        logger.info(
            "workers run as Ray actors on %s (%s; %s each; %s)",
            self.address,
            "a private head" if own_head else "joined",
            "1 GPU" if has_gpu else f"{ray_config.cpus_per_worker:g} CPU",
            auth.describe(own_head),
        )

    def _connect(self, address: str, token: bool) -> None:
        on_main = threading.current_thread() is threading.main_thread()
        handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS} if on_main else {}
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=True, logging_level=logging.WARNING)
            self._connected = True
        except (ConnectionError, RuntimeError, RayError) as exc:
            hint = (
                ""
                if token
                else "; if the cluster uses token authentication, set RAY_AUTH_MODE=token "
                "and give its token (--ray-auth-token-file, RAY_AUTH_TOKEN or ~/.ray/auth_token)"
            )
            raise ChildStartError(f"cannot connect to the Ray cluster at {address}: {exc}{hint}") from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)  # ray.init replaced SIGTERM's with sys.exit

    def _head_num_cpus(self) -> int:
        """CPU slots of a private head: the host's cores, or enough for the most workers the
        pools may have (they then share the cores, as `tandem up`'s processes do)."""
        return max(os.cpu_count() or 1, math.ceil(self._config.max_workers * self._ray_config.cpus_per_worker))

    def spawn(self, role: WorkerRole, worker_id: str) -> RayWorker:
        """One worker actor named `worker_id` (not waited for)."""
        with self._lock:
            return self._spawn_locked(role, worker_id)

    def _spawn_locked(self, role: WorkerRole, worker_id: str) -> RayWorker:
        if self._target is None:
            raise RuntimeError("RayCluster.spawn() before open() or after close()")
        model_dir, secrets = self._target
        index = worker_id.rsplit("-", 1)[-1]
        if index.isdigit():
            self._next_index[role] = max(self._next_index[role], int(index) + 1)
        worker = RayWorker.create(
            self._config,
            role,
            worker_id,
            model_dir,
            secrets,
            self._resources,
            self._config.drain_timeout_s + WORKER_STOP_GRACE_S,
        )
        # Forget the workers that `LocalCluster` retired and stopped (`tandem up --autoscale`).
        self._workers = [w for w in self._workers if not w.removed] + [worker]
        return worker

    def close(self) -> None:
        """Drain and kill every actor left, disconnect, stop the private head, restore the
        environment. Idempotent."""
        with self._lock:
            workers, self._workers, self._target = self._workers, [], None
        for worker in workers:
            worker.terminate()  # all drain at once
        for worker in workers:
            worker.stop(self._config.drain_timeout_s + WORKER_STOP_GRACE_S)
        if self._connected:
            ray.shutdown()
            self._connected = False
        if self._head is not None:
            code = self._head.stop()
            logger.info("Ray head (pid %d) stopped (exit code %d)", self._head.pid, code)
            self._head = None
        if self._saved_environ is not None:
            patch_environ(os.environ, self._saved_environ)
            self._saved_environ = None
            _reload_ray_auth()

    # ---- pools (the ray autoscaler actuator) ---------------------------------------------
    def replicas(self, role: WorkerRole) -> int:
        """Workers of `role` that run or start; draining and exited ones are not counted."""
        with self._lock:
            return len(self._capacity(role))

    def _capacity(self, role: WorkerRole) -> list[RayWorker]:
        return [w for w in self._workers if w.role is role and not w.terminating and w.is_running]

    def add_worker(self, role: WorkerRole) -> str:
        """One more worker of `role` (`{role}-{n}`, never a reused id); returns its id."""
        with self._lock:
            return self._spawn_locked(role, f"{role.value}-{self._next_index[role]}").name

    def retire_newest(self, role: WorkerRole) -> str | None:
        """Start draining the newest worker of `role` without waiting; returns its id, or None
        if the pool is empty. `reap()` kills its actor once the drain is over."""
        with self._lock:
            candidates = self._capacity(role)
            if not candidates:
                return None
            worker = candidates[-1]
            worker.terminate()
        return worker.name

    def reap(self) -> list[str]:
        """Kill the actors whose drain is over; returns `name (exit code N)` of each."""
        with self._lock:
            done = [w for w in self._workers if w.stopped]
            self._workers = [w for w in self._workers if w not in done]
        return [f"{worker.name} (exit code {worker.stop(0.0)})" for worker in done]


def _reload_ray_auth() -> None:
    """Make this process's Ray see the auth variables as they are now. Ray reads them into its
    C++ config and token cache once, at `import ray`; this is what Ray itself does after it
    turns token mode on (`authentication_token_setup._enable_token_auth`), config first."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # not in Ray's stubs

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
