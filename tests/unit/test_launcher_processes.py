"""The harness's calls for benchmarks and tests: `ChildProcess.start`, `address` and `kill`
(the rest of `ChildProcess` is covered in test_launcher.py)."""

from __future__ import annotations

import io
import re
import signal
import sys
import time

import pytest

from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import ChildStartError
from tests.unit.test_launcher import READY, pid_alive


def test_start_returns_a_ready_child_with_its_address() -> None:
    child = ChildProcess.start("ready", [sys.executable, "-c", READY + "import time; time.sleep(60)"], 20)
    try:
        assert (child.ready, child.address) == ({"event": "ready", "address": "127.0.0.1:1"}, "127.0.0.1:1")
    finally:
        assert child.stop(5) == -signal.SIGTERM


def test_start_stops_a_child_that_never_gets_ready() -> None:
    sink = io.StringIO()
    argv = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    with pytest.raises(ChildStartError, match=r"(?s)slow \(pid (\d+)\) not ready after 0.3 s.*loading") as err:
        ChildProcess.start("slow", argv, 0.3, sink=sink)
    pid = re.search(r"pid (\d+)", str(err.value))
    assert pid is not None and not pid_alive(int(pid.group(1)))


def test_address_before_the_ready_line_is_an_error() -> None:
    child = ChildProcess.spawn("mute", [sys.executable, "-c", "import time; time.sleep(60)"], sink=io.StringIO())
    try:
        with pytest.raises(RuntimeError, match=rf"^mute \(pid {child.pid}\) has announced no address$"):
            _ = child.address
    finally:
        child.stop(5)


def test_kill_is_a_crash_not_a_drain() -> None:
    """SIGKILL at once, even for a child that would take its time over SIGTERM; idempotent."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + READY + "time.sleep(60)"
    child = ChildProcess.start("stubborn", [sys.executable, "-c", code], 20, sink=io.StringIO())
    started = time.monotonic()
    assert child.kill() == -signal.SIGKILL
    assert time.monotonic() - started < 1.0 and not pid_alive(child.pid)
    assert child.kill() == -signal.SIGKILL and child.stop(5) == -signal.SIGKILL
