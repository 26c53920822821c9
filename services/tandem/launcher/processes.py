"""The one process harness: a child spawned, watched for its `ready` line, stopped by pid.

`tandem up` (`LocalCluster`), the benchmarks (`tandem.loadtest`: the gateway bench, the KV
source process, `make bench`'s clusters) and the integration and end-to-end tests all start
their processes with it. A child announces itself with one JSON line on stdout,
`{"event": "ready", "address": ..., ...}` (the ready-line protocol, `ready.py`), and stops
cleanly on SIGTERM.

Lifecycle of a `ChildProcess`:
1. `spawn()` starts `argv` with stdin closed and stdout/stderr piped (`start()` is `spawn()`
   then `wait_ready()`, stopping the child if it never gets ready). On Linux the child asks
   the kernel for SIGTERM when its parent dies (`PR_SET_PDEATHSIG`), so a `tandem up` that is
   SIGKILLed leaves no orphans. The child stays in our process group: Ctrl-C in a terminal
   reaches it too, and it treats SIGINT like SIGTERM.
   The death signal is set by a small exec wrapper (`_PDEATHSIG_EXEC`: prctl, then exec of
   `argv`), not by a `preexec_fn`: a `preexec_fn` makes `subprocess` fork() instead of vfork(),
   and grpcio (1.80 and later, grpc/grpc#43055) restarts its poller in a forked child, whose
   epoll fd `close_fds` has closed, so the child could abort ("epoll_wait: Bad file
   descriptor") before it ran anything. With no `preexec_fn`, no fork handler runs.
2. Two daemon threads drain the pipes. The stdout thread looks for the first JSON line with
   `"event": "ready"` and keeps it; every other line, of either stream, goes to our stderr
   with a `[name]` prefix and into a bounded tail kept for error messages.
3. `wait_ready(timeout_s)` returns the ready line, or raises `ChildStartError` (with the
   output tail) if the child exits first or the bound passes; `wait_all_ready()` (`ready.py`)
   waits for several at once and fails as soon as any one of them exits.
4. `stop(timeout_s)` sends SIGTERM once, waits, sends SIGKILL when the bound passes, and
   reaps the child; `kill()` sends SIGKILL at once (a crash, as fault tests want it) and reaps.
   Both are idempotent. The child is only ever addressed by its pid.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process: spawn
children from a thread that lives as long as they do (`tandem up` uses its main thread).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tandem.launcher.ready import ChildStartError, parse_ready, wait_all_ready

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TAIL_LINES = 40
READER_JOIN_S = 1.0
FAILED_START_STOP_S = 5.0  # grace for a child that never got ready


# argv[1]: the parent's pid; argv[2:]: the command. PR_SET_PDEATHSIG survives the exec. If the
# parent died before the prctl, the signal would never come, so the wrapper checks and ends.
_PDEATHSIG_EXEC = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, int(signal.SIGTERM), 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that the child gets SIGTERM when its parent dies; as is off Linux."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *argv]


class ChildProcess:
    """A running child and the threads that drain its output. Build it with `spawn()`.

    Owned by the thread that spawned it; `stop()` may be called from any one thread at a time.
    """

    def __init__(self, name: str, process: subprocess.Popen[str], sink: IO[str] | None, forward: bool) -> None:
        """Wrap a just-started process and start its reader threads. Use `spawn()`."""
        self._name = name
        self._process = process
        self._sink = sink
        self._forward_output = forward
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._ready: dict[str, Any] | None = None
        self._stdout_closed = threading.Event()
        self._signalled = False
        self._readers = [
            threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"{name}-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        sink: IO[str] | None = None,
        forward: bool = True,
    ) -> ChildProcess:
        """Start `argv`. Its output lines go to `sink` (default: our stderr at write time),
        unless `forward` is False: then they are only kept for `output_tail()`."""
        if not argv:
            raise ValueError("argv must name a program")
        child_env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        if shutil.which(argv[0], path=child_env.get("PATH", os.defpath)) is None:  # as Popen would raise it
            raise FileNotFoundError(errno.ENOENT, "no such program", argv[0])
        process = subprocess.Popen(
            _die_with_parent(argv),
            cwd=cwd,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            bufsize=1,
        )
        logger.info("started %s (pid %d)", name, process.pid)
        return cls(name, process, sink, forward)

    @classmethod
    def start(
        cls,
        name: str,
        argv: Sequence[str],
        ready_timeout_s: float,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        sink: IO[str] | None = None,
        forward: bool = True,
    ) -> ChildProcess:
        """`spawn()`, then `wait_ready(ready_timeout_s)`. If the child is not ready in time it
        is stopped (by pid) and `ChildStartError` (with its last output) propagates."""
        child = cls.spawn(name, argv, env=env, cwd=cwd, sink=sink, forward=forward)
        try:
            child.wait_ready(ready_timeout_s)
        except BaseException:
            child.stop(FAILED_START_STOP_S)
            raise
        return child

    # ---- state ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit code once the child has exited (negative: killed by that signal), else None."""
        return self._process.poll()

    @property
    def is_running(self) -> bool:
        return self._process.poll() is None

    @property
    def ready(self) -> dict[str, Any] | None:
        """The child's JSON ready line, once it printed one."""
        return self._ready

    @property
    def address(self) -> str:
        """The `address` of the child's ready line (a worker's `host:port`, a gateway's URL)."""
        if self._ready is None or not isinstance(self._ready.get("address"), str):
            raise RuntimeError(f"{self._name} (pid {self.pid}) has announced no address")
        return str(self._ready["address"])

    def output_tail(self) -> str:
        """The last lines the child printed (stdout lines other than the ready line, and stderr)."""
        return "".join(list(self._tail)).rstrip() or "<no output>"

    # ---- waiting -------------------------------------------------------------------------
    def check_ready(self) -> dict[str, Any] | None:
        """Non-blocking: the ready line once it arrived, None while the child is starting;
        `ChildStartError` (with its last output) if it exited or closed stdout without one."""
        if self._ready is not None:
            return self._ready
        if not self._stdout_closed.is_set() and self._process.poll() is None:
            return None
        self._stdout_closed.wait(READER_JOIN_S)  # let the last lines arrive
        if self._ready is not None:
            return self._ready
        try:
            status = f"exited with code {self._process.wait(timeout=READER_JOIN_S)}"
        except subprocess.TimeoutExpired:
            status = "closed its stdout"
        raise ChildStartError(
            f"{self._name} (pid {self.pid}) {status} before it was ready; its last output:\n{self._settled_tail()}"
        )

    def wait_ready(self, timeout_s: float, cancelled: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Block until the ready line arrives; see `wait_all_ready`."""
        wait_all_ready([self], timeout_s, cancelled)
        assert self._ready is not None
        return self._ready

    def _settled_tail(self) -> str:
        for reader in self._readers:
            reader.join(READER_JOIN_S)
        return self.output_tail()

    # ---- stopping ------------------------------------------------------------------------
    def terminate(self) -> None:
        """Send SIGTERM once (a second one could land after the child restored the default
        handler during its shutdown). Does not wait. No-op once the child has exited."""
        if self._signalled or self._process.poll() is not None:
            return
        self._signalled = True
        try:
            os.kill(self._process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float) -> int:
        """SIGTERM (unless `terminate()` already sent it), wait up to `timeout_s`, then SIGKILL
        and reap. Returns the exit code. Idempotent; bounded by about 2 * `timeout_s`."""
        self.terminate()
        try:
            code = self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s (pid %d) still running %s s after SIGTERM; sending SIGKILL", self._name, self.pid, timeout_s
            )
            self._process.kill()
            code = self._process.wait(timeout=timeout_s)
        for reader in self._readers:
            reader.join(READER_JOIN_S)  # a grandchild may hold the pipes open: bounded
        return code

    def kill(self) -> int:
        """SIGKILL now (no drain: what a crash looks like) and reap; returns the exit code
        (-9 unless the child had already exited). Idempotent."""
        if self._process.poll() is None:
            self._signalled = True
            self._process.kill()
        return self.stop(READER_JOIN_S)

    # ---- reader threads ------------------------------------------------------------------
    def _read_stdout(self) -> None:
        stream = self._process.stdout
        assert stream is not None
        try:
            for line in stream:
                if self._ready is None:
                    ready = parse_ready(line)
                    if ready is not None:
                        self._ready = ready
                        logger.info("%s (pid %d) is ready at %s", self._name, self.pid, ready.get("address"))
                        continue
                self._forward(line)
        finally:
            self._stdout_closed.set()

    def _read_stderr(self) -> None:
        stream = self._process.stderr
        assert stream is not None
        for line in stream:
            self._forward(line)

    def _forward(self, line: str) -> None:
        text = line if line.endswith("\n") else line + "\n"
        self._tail.append(text)
        if not self._forward_output:
            return
        sink = self._sink if self._sink is not None else sys.stderr
        try:
            sink.write(f"[{self._name}] {text}")
            sink.flush()
        except (OSError, ValueError):
            pass  # our stderr is gone: keep draining the pipe so the child never blocks
