"""A whole cluster as local processes: Redis, workers and a gateway (`tandem up`).

Lifecycle of a `LocalCluster`:
1. `start()` resolves the model (the generated tiny model unless one is named), starts a
   private redis-server unless `redis_url` names one (with a generated password), then spawns
   every worker and the gateway at once (each worker with the host's cores divided among the
   workers). It waits for every ready line, then polls the gateway (`gateway_child.py`) until
   `GET /ready` answers 200 (a decode worker is routable) and its `tandem_workers{pool}` gauge
   counts every worker started here (so the first request can already use the prefill pool),
   all within `ready_timeout_s`.
   If anything fails it stops what it started and raises `ClusterStartError` naming the
   child and quoting its last output.
2. While it runs, `endpoint` is the gateway's base URL and `dead_children()` names children
   that exited on their own; `restart(name)` starts such a child again in its place (the
   `Supervisor` of `tandem up` decides when, `supervisor.py`).
3. Pools can change while it runs (the `local` autoscaler actuator, from this same thread):
   `add_worker(role)` spawns one more worker (not waited for: the gateway routes to it once
   it registered); `retire_worker(role)` sends the newest worker of the pool SIGTERM, which
   drains it (it leaves Redis, finishes its sequences, releases its leases) before it exits;
   `reap_retired()` collects the retired workers that exited.
4. `stop()` stops the gateway first (no new requests), then all workers at once (each
   drains, bounded by `drain_timeout_s`), then Redis. Idempotent; also runs on `with` exit.
   The children share our process group, so a terminal's Ctrl-C signals all of them at once
   and that order then holds only loosely; a SIGTERM to our pid gets it exactly.

The cluster token (`plane_auth`) is the config's, or one generated here (unless the plane is
insecure); every child gets it and the Redis URL in its environment (`ChildSecrets`).

Every child is spawned from the thread that calls `start()`: PR_SET_PDEATHSIG is tied to that
thread (see `processes.py`), so call `start()` from a thread that outlives the cluster.
"""

from __future__ import annotations

import logging
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from tandem.common.embedded_redis import EmbeddedRedisError
from tandem.common.plane_auth import ClusterToken
from tandem.common.workers import WorkerRole
from tandem.launcher.config import ChildSecrets, LocalClusterConfig
from tandem.launcher.gateway_child import gateway_endpoint, spawn_gateway, wait_routable
from tandem.launcher.placement import ProcessPlacement, WorkerPlacement, WorkerProcess
from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import ChildStartError, wait_all_ready
from tandem.launcher.redis_child import RedisChild
from tandem.launcher.state_file import ChildSummary

logger = logging.getLogger(__name__)

WORKER_STOP_GRACE_S = 5.0
REDIS_PASSWORD_BYTES = 24  # of the private redis-server's generated password


class ClusterStartError(RuntimeError):
    """The cluster did not come up; everything it had started is stopped again."""


class LocalCluster:
    """Owns the processes of one local cluster. Not thread-safe: start and stop it from the
    thread that created it; `endpoint` may be read from anywhere."""

    def __init__(
        self, config: LocalClusterConfig, sink: IO[str] | None = None, placement: WorkerPlacement | None = None
    ) -> None:
        """Nothing starts until `start()`. Children's output goes to `sink` (default stderr).
        `placement` runs the workers (default: our child processes; see `placement.py`)."""
        self._config = config
        self._sink = sink
        self._placement = placement if placement is not None else ProcessPlacement(config, sink)
        self._redis: RedisChild | None = None
        self._workers: list[WorkerProcess] = []  # serving or starting
        self._retiring: list[WorkerProcess] = []  # told to drain; reaped once they exited
        self._next_index = {WorkerRole.PREFILL: config.num_prefill, WorkerRole.DECODE: config.num_decode}
        self._gateway: ChildProcess | None = None
        self._redis_url: str | None = config.redis_url
        self._endpoint: str | None = None
        self._started = False
        self._stopped = False
        self._model_dir: Path | None = config.model_dir
        plane = config.worker.plane
        self._token = plane.token if plane.token is not None or plane.insecure_no_auth else ClusterToken.generate()

    @property
    def config(self) -> LocalClusterConfig:
        return self._config

    @property
    def endpoint(self) -> str:
        """The gateway's base URL, e.g. `http://127.0.0.1:8000`."""
        if self._endpoint is None:
            raise RuntimeError("the cluster is not running")
        return self._endpoint

    @property
    def model_dir(self) -> Path:
        """The served model's directory (known once `start()` resolved it)."""
        if self._model_dir is None:
            raise RuntimeError("the cluster has not resolved its model yet")
        return self._model_dir

    @property
    def redis_url(self) -> str:
        """The URL every child uses (with the password of a private Redis: show it only
        through `redis_url.redact`)."""
        if self._redis_url is None:
            raise RuntimeError("the cluster is not running")
        return self._redis_url

    @property
    def token(self) -> ClusterToken | None:
        """The cluster token every child shares (None: `--insecure-no-auth`)."""
        return self._token

    def _secrets(self) -> ChildSecrets:
        return ChildSecrets(self.redis_url, self._token)

    def children(self) -> list[ChildSummary]:
        """Every child that was started, Redis (if ours) first, then workers, then the gateway."""
        summaries = []
        for child in self._processes():
            ready = child.ready or {}
            address = ready.get("address") if child is not self._gateway else self._endpoint
            summaries.append(ChildSummary(child.name, child.pid, address, ready.get("metrics_port")))
        return summaries

    def dead_children(self) -> list[str]:
        """`name (exit code N)` of every child that has exited (call it before `stop()`)."""
        return [f"{child.name} (exit code {child.returncode})" for child in self._processes() if not child.is_running]

    def exited(self) -> list[WorkerProcess]:
        """The children (Redis if ours, workers, gateway) that exited on their own; retiring
        workers are not among them."""
        return [child for child in self._processes() if not child.is_running]

    def restart(self, name: str) -> WorkerProcess:
        """Start the exited child `name` again, in its place, and return the new one (the
        supervisor's effect, `supervisor.py`). Redis comes back on its port and the gateway on
        its address, so clients reconnect as they are; a worker comes back under its worker
        id (a new epoch: gateways drop its old prefix index entries) and is not waited for.
        Raises `ChildStartError` / `EmbeddedRedisError` if Redis does not start (the old
        child stays in place, still exited)."""
        if self._endpoint is None:
            raise RuntimeError("the cluster is not running")
        if self._redis is not None and name == self._redis.child.name:
            self._redis.stop(timeout_s=1.0)  # reaps it and deletes its directory
            self._redis = RedisChild.start(
                ready_timeout_s=min(30.0, self._config.ready_timeout_s),
                sink=self._sink,
                port=self._redis.port,
                password=self._redis.password,
            )
            return self._redis.child
        if self._gateway is not None and name == self._gateway.name:
            self._gateway.stop(0.0)
            port = int(self._endpoint.rsplit(":", 1)[1])
            self._gateway = spawn_gateway(self._config, self.model_dir, self._secrets(), self._sink, port)
            return self._gateway
        for i, worker in enumerate(self._workers):
            if worker.name == name:
                worker.stop(0.0)
                self._workers[i] = replacement = self._placement.spawn(_role_of(worker), name)
                return replacement
        raise KeyError(f"no child named {name!r}")

    def _processes(self) -> list[WorkerProcess]:
        processes = ([self._redis.child] if self._redis is not None else []) + self._workers
        return processes + ([self._gateway] if self._gateway is not None else [])

    # ---- start ---------------------------------------------------------------------------
    def start(self, cancelled: Callable[[], bool] | None = None) -> None:
        """Bring the whole cluster up (bounded by `ready_timeout_s`); see the module doc.
        `cancelled()` is polled while waiting: once true, start stops everything and raises
        `StartCancelled` (how `tandem up` honours a SIGTERM during start-up)."""
        if self._started:
            raise RuntimeError("a LocalCluster starts once")
        self._started = True
        try:
            self._start(cancelled or (lambda: False))
        except BaseException as exc:
            self.stop()
            if isinstance(exc, (ChildStartError, EmbeddedRedisError)):
                raise ClusterStartError(f"the local cluster did not start: {exc}") from exc
            raise

    def _start(self, cancelled: Callable[[], bool]) -> None:
        config = self._config
        deadline = time.monotonic() + config.ready_timeout_s
        model_dir = config.model_dir if config.model_dir is not None else _tiny_model_dir()
        self._model_dir = model_dir
        if config.redis_url is None:
            self._redis = RedisChild.start(
                ready_timeout_s=min(30.0, config.ready_timeout_s),
                sink=self._sink,
                password=secrets.token_urlsafe(REDIS_PASSWORD_BYTES),
            )
            self._redis_url = self._redis.url
        child_secrets = self._secrets()
        # Spawn everything before waiting on anything: the processes load their models in
        # parallel. The gateway only routes to workers that registered, and /ready says when.
        # Local children come first: a Ray Client connection (`open()`) runs gRPC threads, and a
        # fork after that can abort in the child (gRPC's fork handlers).
        self._gateway = spawn_gateway(config, model_dir, child_secrets, self._sink)
        self._placement.open(model_dir, child_secrets, _remaining(deadline), cancelled)
        for role, worker_id in config.worker_ids():
            self._spawn_worker(role, worker_id)
        wait_all_ready([*self._workers, self._gateway], _remaining(deadline), cancelled)
        self._endpoint = gateway_endpoint(self._gateway)
        wait_routable(self._gateway, self._endpoint, config, deadline, cancelled, self._processes)

    def _spawn_worker(self, role: WorkerRole, worker_id: str) -> WorkerProcess:
        child = self._placement.spawn(role, worker_id)
        self._workers.append(child)
        return child

    # ---- pool changes (the local autoscaler actuator) ----------------------------------
    def pool_size(self, role: WorkerRole) -> int:
        """Workers of `role` that serve or are starting (retiring ones are not counted)."""
        return sum(1 for child in self._workers if _role_of(child) is role)

    def add_worker(self, role: WorkerRole) -> str:
        """Spawn one more worker of `role` (not waited for); returns its worker id."""
        if self._endpoint is None:
            raise RuntimeError("the cluster is not running")
        index = self._next_index[role]
        self._next_index[role] = index + 1
        return self._spawn_worker(role, f"{role.value}-{index}").name

    def retire_worker(self, role: WorkerRole) -> str | None:
        """Start draining the newest worker of `role` (SIGTERM); returns its id, or None if
        the pool is empty. It leaves the pool at once and is reaped once it exited."""
        candidates = [child for child in self._workers if _role_of(child) is role]
        if not candidates:
            return None
        child = candidates[-1]
        self._workers.remove(child)
        self._retiring.append(child)
        child.terminate()
        logger.info("retiring %s (pid %d): draining", child.name, child.pid)
        return child.name

    def reap_retired(self) -> list[str]:
        """Forget the retired workers that exited; returns `name (exit code N)` of each."""
        gone = [child for child in self._retiring if not child.is_running]
        for child in gone:
            self._retiring.remove(child)
            self._log_exit(child, child.stop(0.0))
        return [f"{child.name} (exit code {child.returncode})" for child in gone]

    # ---- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Gateway, then workers (they drain), then the placement's own (`close()`: a Ray head),
        then Redis; each by pid, each bounded. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._gateway is not None:
            self._log_exit(self._gateway, self._gateway.stop(self._config.gateway_stop_timeout_s))
        workers = self._retiring + self._workers
        for worker in workers:
            worker.terminate()  # all drain at once
        for worker in workers:
            self._log_exit(worker, worker.stop(self._config.drain_timeout_s + WORKER_STOP_GRACE_S))
        self._placement.close()
        if self._redis is not None:
            self._log_exit(self._redis.child, self._redis.stop())
        self._endpoint = None

    @staticmethod
    def _log_exit(child: WorkerProcess, code: int) -> None:
        # Dying of a stop signal is a clean stop: a terminal's Ctrl-C reaches every child at
        # once (they share our process group), and our SIGTERM may then land after a child
        # restored the default handlers on its way out.
        if code in (0, -signal.SIGTERM, -signal.SIGINT):
            logger.info("%s (pid %d) stopped (exit code %d)", child.name, child.pid, code)
        else:
            logger.warning("%s (pid %d) exited with code %d", child.name, child.pid, code)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _role_of(child: WorkerProcess) -> WorkerRole:
    """Worker names are `{role}-{index}` (`LocalClusterConfig.worker_ids`, `add_worker`)."""
    return WorkerRole(child.name.rsplit("-", 1)[0])


def _tiny_model_dir() -> Path:
    from tandem.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def _remaining(deadline: float) -> float:
    return max(0.01, deadline - time.monotonic())
