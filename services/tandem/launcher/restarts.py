"""When `tandem up` restarts a child that died: the policy (a frozen config) and its pure
bookkeeping (`RestartTracker`), kept apart from the processes so that tests can read them as
tables.

A child that exits on its own (a crash, a SIGKILL, an OOM kill) is restarted after a delay
that doubles with each restart still inside the window: `backoff_s`, `2 * backoff_s`, ...,
at most `backoff_max_s`. Restarts older than `window_s` are forgotten, so a child that crashes
once a day is restarted every time. The restart that would be number `max_restarts + 1`
within one window is refused: the child is crash-looping (a bad flag, a broken model, a
port it cannot bind) and restarting it again only hides that. `tandem up` then stops the
whole cluster and exits 1 with the child's last output, as systemd does for a unit past its
start limit, so that an operator sees the failure instead of a cluster that quietly runs
without a pool. `max_restarts = 0` turns restarts off (the first death stops the cluster).
"""

from __future__ import annotations

import math
import signal
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    """How `tandem up` restarts a child that died (times in seconds); see the module doc."""

    max_restarts: int = field(
        default=5, metadata={"flag": "max", "help": "restarts of one child within the window (0: never restart)"}
    )
    window_s: float = field(default=300.0, metadata={"help": "restarts older than this are forgotten"})
    backoff_s: float = field(default=1.0, metadata={"help": "delay before the first restart; doubles each time"})
    backoff_max_s: float = field(default=30.0, metadata={"help": "longest delay before a restart"})

    def __post_init__(self) -> None:
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"restart max_restarts must be an int >= 0, got {self.max_restarts!r}")
        for name in ("window_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"restart {name} must be a finite number > 0, got {value!r}")
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(f"restart backoff_max_s ({self.backoff_max_s}) must be >= backoff_s ({self.backoff_s})")


@dataclass(frozen=True)
class RestartDecision:
    """What to do about one death: restart after `delay_s` (this is restart `attempt` of
    `limit` within the window), or give up (`delay_s` is None)."""

    delay_s: float | None
    attempt: int
    limit: int

    @property
    def give_up(self) -> bool:
        return self.delay_s is None


class RestartTracker:
    """The restarts of one child (by name) within the policy's window. Owned by the thread
    that supervises the cluster; `on_exit` is called once per death, with a monotonic `now_s`."""

    def __init__(self, policy: RestartPolicy) -> None:
        self._policy = policy
        self._restarts: deque[float] = deque()  # monotonic times of the restarts in the window

    def on_exit(self, now_s: float) -> RestartDecision:
        """Decide about a death at `now_s`; a restart decided here counts from `now_s`."""
        policy = self._policy
        while self._restarts and now_s - self._restarts[0] >= policy.window_s:
            self._restarts.popleft()
        attempt = len(self._restarts) + 1
        if attempt > policy.max_restarts:
            return RestartDecision(None, attempt, policy.max_restarts)
        self._restarts.append(now_s)
        delay_s = min(policy.backoff_max_s, policy.backoff_s * 2.0 ** (attempt - 1))
        return RestartDecision(delay_s, attempt, policy.max_restarts)


def exit_status(code: int | None) -> str:
    """`status 1`, or `signal SIGKILL (-9)` for a child killed by a signal."""
    if code is None:
        return "status unknown"
    if code < 0:
        try:
            return f"status {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"status {code}"
    return f"status {code}"
