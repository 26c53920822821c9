"""The restart policy of `tandem up` as a table, and the supervisor on real child processes
(`sleep`), with a fake clock: exact delays, exact log lines, the limit, the window."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest

from tandem.launcher.config import LocalClusterConfig
from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import ChildStartError
from tandem.launcher.restarts import RestartDecision, RestartPolicy, RestartTracker, exit_status
from tandem.launcher.supervisor import RestartLimitReached, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _d(delay_s: float | None, attempt: int) -> RestartDecision:
    return RestartDecision(delay_s, attempt, 3)


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        # backoff 1 s doubling to at most 4 s, 3 restarts per 100 s
        ([0.0], [_d(1.0, 1)]),
        ([0.0, 5.0, 10.0], [_d(1.0, 1), _d(2.0, 2), _d(4.0, 3)]),
        ([0.0, 1.0, 2.0, 3.0], [_d(1.0, 1), _d(2.0, 2), _d(4.0, 3), _d(None, 4)]),
        # the first restart leaves the window at 100 s: the fourth death is restart 3 again
        ([0.0, 50.0, 60.0, 100.0], [_d(1.0, 1), _d(2.0, 2), _d(4.0, 3), _d(4.0, 3)]),
        # a refused restart does not count: the window still holds three at 99.9 s
        ([0.0, 1.0, 2.0, 99.9, 100.0], [_d(1.0, 1), _d(2.0, 2), _d(4.0, 3), _d(None, 4), _d(4.0, 3)]),
    ],
)
def test_restart_tracker_table(times: list[float], expected: list[RestartDecision]) -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=3, window_s=100.0, backoff_s=1.0, backoff_max_s=4.0))
    assert [tracker.on_exit(t) for t in times] == expected


def test_max_restarts_zero_never_restarts() -> None:
    decision = RestartTracker(RestartPolicy(max_restarts=0)).on_exit(0.0)
    assert decision == RestartDecision(None, 1, 0) and decision.give_up


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_restarts": -1}, "restart max_restarts must be an int >= 0, got -1"),
        ({"window_s": 0.0}, "restart window_s must be a finite number > 0, got 0.0"),
        ({"backoff_s": float("inf")}, "restart backoff_s must be a finite number > 0, got inf"),
        ({"backoff_s": 5.0, "backoff_max_s": 2.0}, "restart backoff_max_s (2.0) must be >= backoff_s (5.0)"),
    ],
)
def test_restart_policy_is_validated(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as info:
        RestartPolicy(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_restart_flags_reach_the_config() -> None:
    config = LocalClusterConfig(restart=RestartPolicy(max_restarts=2, window_s=60.0))
    assert (config.restart.max_restarts, config.restart.window_s, config.restart.backoff_s) == (2, 60.0, 1.0)


def test_exit_status_names_the_signal() -> None:
    assert [exit_status(c) for c in (1, -9, -15, None)] == [
        "status 1",
        "status -9 (SIGKILL)",
        "status -15 (SIGTERM)",
        "status unknown",
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class SleeperCluster:
    """Children that sleep; `restart` spawns a new sleeper, or fails for names in `broken`."""

    def __init__(self, names: list[str]) -> None:
        self.children = {name: ChildProcess.spawn(name, SLEEPER, forward=False) for name in names}
        self.broken: set[str] = set()
        self.restarted: list[str] = []

    def exited(self) -> list[ChildProcess]:
        return [child for child in self.children.values() if not child.is_running]

    def restart(self, name: str) -> ChildProcess:
        self.restarted.append(name)
        if name in self.broken:
            raise ChildStartError(f"{name} would not start")
        self.children[name] = ChildProcess.spawn(name, SLEEPER, forward=False)
        return self.children[name]

    def stop(self) -> None:
        for child in self.children.values():
            child.stop(5.0)


@pytest.fixture
def sleepers() -> Iterator[SleeperCluster]:
    cluster = SleeperCluster(["decode-0", "redis"])
    yield cluster
    cluster.stop()


def test_supervisor_restarts_after_backoff_and_says_so(
    sleepers: SleeperCluster, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    supervisor = Supervisor(sleepers, RestartPolicy(max_restarts=2, backoff_s=1.0), clock)
    assert supervisor.poll() is False
    old_pid = sleepers.children["decode-0"].pid
    sleepers.children["decode-0"].kill()
    with caplog.at_level(logging.WARNING, logger="tandem.launcher.supervisor"):
        assert supervisor.poll() is False  # decided, not yet due
        clock.now_s = 0.99
        assert supervisor.poll() is False
        assert sleepers.restarted == []
        clock.now_s = 1.0
        assert supervisor.poll() is True
    new = sleepers.children["decode-0"]
    assert sleepers.restarted == ["decode-0"] and new.pid != old_pid and new.is_running
    assert supervisor.num_restarts == 1
    assert [r.getMessage() for r in caplog.records] == [
        "decode-0 exited with status -9 (SIGKILL); restarting in 1.0 s (restart 1 of 2)",
        f"decode-0 restarted (pid {new.pid})",
    ]


def test_supervisor_gives_up_past_the_limit(sleepers: SleeperCluster) -> None:
    clock = FakeClock()
    supervisor = Supervisor(sleepers, RestartPolicy(max_restarts=1, backoff_s=1.0), clock)
    sleepers.children["redis"].kill()
    supervisor.poll()
    clock.now_s = 1.0
    assert supervisor.poll() is True
    sleepers.children["redis"].kill()
    with pytest.raises(RestartLimitReached) as info:
        supervisor.poll()
    assert (
        str(info.value)
        == "redis exited with status -9 (SIGKILL) after 1 restart(s) within 300 s; its last output:\n<no output>"
    )
    assert sleepers.restarted == ["redis"]


def test_a_failed_restart_counts_as_a_death(sleepers: SleeperCluster, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    supervisor = Supervisor(sleepers, RestartPolicy(max_restarts=2, backoff_s=1.0), clock)
    sleepers.broken.add("redis")
    sleepers.children["redis"].kill()
    with caplog.at_level(logging.WARNING, logger="tandem.launcher.supervisor"):
        supervisor.poll()
        clock.now_s = 1.0
        assert supervisor.poll() is False
        clock.now_s = 3.0
        with pytest.raises(RestartLimitReached) as info:
            supervisor.poll()
    assert sleepers.restarted == ["redis", "redis"]
    assert [r.getMessage() for r in caplog.records] == [
        "redis exited with status -9 (SIGKILL); restarting in 1.0 s (restart 1 of 2)",
        "redis exited with a failed restart; restarting in 2.0 s (restart 2 of 2)",
    ]
    assert str(info.value).startswith("redis exited with a failed restart after 2 restart(s) within 300 s")
