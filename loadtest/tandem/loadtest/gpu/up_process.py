"""`tandem up` as one child of a GPU-check step: started, waited for and stopped, all by pid.

Lifecycle of an `UpProcess`:
1. `start(flags, cache_dir, log, timeout_s)` spawns `python -m tandem up FLAGS` with the
   launcher's harness (`ChildProcess`; on Linux it dies with us), with $TANDEM_CACHE_DIR set to
   `cache_dir` so that its state file (`up.json`, written once the gateway routes to every
   worker) is ours alone. Its output, with that of every process it started (each line prefixed
   `[name]`), goes to `log`. It returns once the state file names this `tandem up`, or stops it
   and raises `UpStartError` (with its last output) if it exits first or `timeout_s` passes.
2. `endpoint` is the gateway's base URL; `children` the processes `tandem up` started
   (Redis, the workers, the gateway), as its state file lists them.
3. `stop(timeout_s)` sends SIGTERM (`tandem up` stops the gateway, then the workers, then
   Redis, and exits 0), SIGKILL after the bound; then every child still alive (none, unless
   `tandem up` itself had to be killed: its children then get SIGTERM from the kernel) is
   waited for and, past the bound, killed by its pid. It returns what became of each process.
   Idempotent.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tandem.launcher.processes import ChildProcess
from tandem.launcher.state_file import STATE_FILE_NAME, ChildSummary, read_state

POLL_INTERVAL_S = 0.1
NAME = "tandem up"


class UpStartError(RuntimeError):
    """`tandem up` exited, or its cluster was not up within the bound; it has been stopped."""


@dataclass(frozen=True)
class ProcessExit:
    """One process of the cluster after `stop()`: `outcome` is `exit code N` (`tandem up`),
    `stopped` (a child that `tandem up` stopped) or `killed by pid` (one we had to kill)."""

    name: str
    pid: int
    outcome: str


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_ours(pid: int) -> bool:
    """Whether `pid` still runs one of the cluster's programs (not a process that reused it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tandem" in cmdline or b"redis-server" in cmdline


class UpProcess:
    """A running `tandem up`. Owned by the thread that started it (its children die with it)."""

    def __init__(self, child: ChildProcess, endpoint: str, children: tuple[ChildSummary, ...]) -> None:
        """Wrap a `tandem up` whose cluster is up. Use `start()`."""
        self._child = child
        self._endpoint = endpoint
        self._children = children
        self._exits: list[ProcessExit] | None = None

    @classmethod
    def start(cls, flags: Sequence[str], cache_dir: Path, log: IO[str], timeout_s: float) -> UpProcess:
        """Spawn `tandem up FLAGS` and wait (bounded) until its cluster is up; see the module doc."""
        cache_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TANDEM_CACHE_DIR": str(cache_dir)}
        argv = [sys.executable, "-m", "tandem", "up", *flags]
        child = ChildProcess.spawn(NAME, argv, env=env, cwd=cache_dir, sink=log)
        state_path = cache_dir / STATE_FILE_NAME
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                state = read_state(state_path)
                if state is not None and state.pid == child.pid:
                    return cls(child, state.endpoint, state.children)
                if not child.is_running:
                    raise UpStartError(
                        f"tandem up exited with code {child.returncode} before its cluster was up; "
                        f"its last output:\n{child.output_tail()}"
                    )
                if time.monotonic() >= deadline:
                    raise UpStartError(
                        f"tandem up's cluster was not up after {timeout_s:.0f} s; its last output:\n"
                        f"{child.output_tail()}"
                    )
                time.sleep(POLL_INTERVAL_S)
        except BaseException:
            child.stop(timeout_s=30.0)  # SIGTERM: it stops what it started, even mid-start
            raise

    @property
    def endpoint(self) -> str:
        """The gateway's base URL, e.g. `http://127.0.0.1:40123`."""
        return self._endpoint

    @property
    def pid(self) -> int:
        return self._child.pid

    @property
    def children(self) -> tuple[ChildSummary, ...]:
        return self._children

    def output_tail(self) -> str:
        return self._child.output_tail()

    def stop(self, timeout_s: float) -> list[ProcessExit]:
        """Stop `tandem up` and make sure every child is gone; see the module doc."""
        if self._exits is not None:
            return self._exits
        code = self._child.stop(timeout_s)
        exits = [ProcessExit(NAME, self._child.pid, f"exit code {code}")]
        deadline = time.monotonic() + timeout_s
        for summary in self._children:
            while pid_alive(summary.pid) and _is_ours(summary.pid) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_S)
            outcome = "stopped"
            if pid_alive(summary.pid) and _is_ours(summary.pid):
                os.kill(summary.pid, signal.SIGKILL)
                outcome = "killed by pid"
            exits.append(ProcessExit(summary.name, summary.pid, outcome))
        self._exits = exits
        return exits
