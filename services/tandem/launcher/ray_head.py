"""A private, single-node Ray cluster for `tandem up --ray` without an address.

It is `ray start --head --block` run as our `ChildProcess`: in `--block` mode that process
owns the GCS, the raylet and Ray's other daemons (they die with it: Ray sets their
PR_SET_PDEATHSIG), and on SIGTERM it stops them all and exits. So the head is stopped by one
pid, never by `ray stop` (which kills every process of the machine whose name or command
line matches one of Ray's, whoever started it).

Lifecycle of a `RayHead`:
1. The caller makes a private temp dir (`make_temp_dir`: Ray's sessions, logs and sockets, and
   a fresh auth token when one is needed). `start()` picks every port Ray would otherwise
   default (GCS, node manager, object manager, Ray Client server, agents, metrics: free
   ephemeral ports; Ray's worker processes: a free window in WORKER_PORT_SPAN, since Ray's
   default 10002-19999 is left to other services), spawns the head and waits, bounded, until
   Ray writes its address into the temp dir (the last step of `ray start`). On failure it
   stops the child, deletes the temp dir and raises `ChildStartError`.
2. `address` is the GCS address (`ip:port`) that `ray.init` and `ray start --address` join.
3. `stop()` sends SIGTERM (SIGKILL after the bound) and deletes the temp dir. Idempotent.
"""

from __future__ import annotations

import random
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from tandem.common.embedded_redis import free_port
from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import ChildStartError, StartCancelled

ADDRESS_FILE = "ray_current_cluster"  # written by `ray start` once the node is up
POLL_INTERVAL_S = 0.1
STOP_TIMEOUT_S = 15.0
OBJECT_STORE_BYTES = 128 * 1024 * 1024  # workers pass no objects through Ray; keep /dev/shm small
WORKER_PORT_SPAN = (20000, 32000)  # below the kernel's ephemeral range, above 10002-19999
WORKER_PORT_WINDOW = 200  # one port per Ray worker process
WINDOW_ATTEMPTS = 20
# Ray's head waits this long on SIGTERM for its node to drain; our workers drained before.
HEAD_ENV = {
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
}
CLIENT_PORT_FLAG = "--ray-client-server-port"
PORT_FLAGS = (
    "--port",
    "--node-manager-port",
    "--object-manager-port",
    CLIENT_PORT_FLAG,
    "--runtime-env-agent-port",
    "--dashboard-agent-grpc-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
)


class RayHead:
    """A running head node. The creator owns it and must `stop()` it."""

    def __init__(self, child: ChildProcess, temp_dir: Path, address: str, client_port: int) -> None:
        """Wrap a ready head. Use `start()`."""
        self._child = child
        self._temp_dir = temp_dir
        self._address = address
        self._client_port = client_port

    @classmethod
    def start(
        cls,
        temp_dir: Path,
        env: Mapping[str, str],
        num_cpus: int,
        timeout_s: float,
        cancelled: Callable[[], bool],
        sink: IO[str] | None = None,
    ) -> RayHead:
        """Start a head in `temp_dir` (made by `make_temp_dir`; deleted by `stop()`, or here
        on failure) with `env` (the auth variables included) and `num_cpus` CPU slots."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        ports = _free_ports()
        low, high = _worker_port_window()
        argv = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--temp-dir",
            str(temp_dir),
            "--num-cpus",
            str(num_cpus),
            "--include-dashboard",
            "false",
            "--object-store-memory",
            str(OBJECT_STORE_BYTES),
            "--disable-usage-stats",
            "--min-worker-port",
            str(low),
            "--max-worker-port",
            str(high),
        ]
        for flag, port in ports.items():
            argv += [flag, str(port)]
        # Its log (banners, next steps) is kept for errors, not shown.
        child = ChildProcess.spawn("ray-head", argv, env={**env, **HEAD_ENV}, cwd=temp_dir, sink=sink, forward=False)
        try:
            address = _wait_address(child, temp_dir / ADDRESS_FILE, timeout_s, cancelled)
        except BaseException:
            child.stop(STOP_TIMEOUT_S)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return cls(child, temp_dir, address, ports[CLIENT_PORT_FLAG])

    @property
    def address(self) -> str:
        return self._address

    @property
    def client_address(self) -> str:
        """The head's Ray Client server, `ray://ip:port` (a driver on another machine joins here)."""
        return f"ray://{self._address.rsplit(':', 1)[0]}:{self._client_port}"

    @property
    def pid(self) -> int:
        return self._child.pid

    @property
    def is_running(self) -> bool:
        return self._child.is_running

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Stop the head (and with it every Ray process of this cluster) by pid, delete its
        temp dir. Idempotent. The exit code of `ray start --block` after SIGTERM is 1."""
        code = self._child.stop(timeout_s)
        shutil.rmtree(self._temp_dir, ignore_errors=True)
        return code


def make_temp_dir() -> Path:
    """A new private directory for a head. Short: Ray puts Unix sockets under it (108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="tandem-ray-", dir="/tmp" if Path("/tmp").is_dir() else None))


def _free_ports() -> dict[str, int]:
    """A distinct free port for each of PORT_FLAGS (two probes may return the same one)."""
    while True:
        ports = {flag: free_port() for flag in PORT_FLAGS}
        if len(set(ports.values())) == len(ports):
            return ports


def _worker_port_window() -> tuple[int, int]:
    """A window of WORKER_PORT_WINDOW ports in WORKER_PORT_SPAN that are all free right now."""
    for _ in range(WINDOW_ATTEMPTS):
        low = random.randrange(WORKER_PORT_SPAN[0], WORKER_PORT_SPAN[1] - WORKER_PORT_WINDOW)
        if all(_is_free(port) for port in range(low, low + WORKER_PORT_WINDOW)):
            return low, low + WORKER_PORT_WINDOW - 1
    raise ChildStartError(f"no {WORKER_PORT_WINDOW} free ports in a row in {WORKER_PORT_SPAN} for Ray's workers")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _wait_address(child: ChildProcess, address_file: Path, timeout_s: float, cancelled: Callable[[], bool]) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            address = address_file.read_text().strip()
        except FileNotFoundError:
            address = ""
        if address:
            return address
        if not child.is_running:
            code = child.stop(timeout_s=1.0)  # reaps it and lets its last lines arrive
            raise ChildStartError(f"the Ray head exited with code {code} before it was up:\n{child.output_tail()}")
        if cancelled():
            raise StartCancelled("cancelled while the Ray head was starting")
        if time.monotonic() >= deadline:
            raise ChildStartError(f"the Ray head was not up after {timeout_s} s:\n{child.output_tail()}")
        time.sleep(POLL_INTERVAL_S)
