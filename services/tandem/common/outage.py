"""One log line when a dependency (Redis) goes away and one when it is back, not one per call.

A thread that calls Redis in a loop (a worker's heartbeat and KV event publisher, a gateway's
registry refresher, KV event follower and rate limiter) owns one `Outage` and reports each
call's outcome: `failed(exc)` and `ok()`. The first failure after a success logs a warning
naming what failed; later failures only count. The first success after failures logs how long
the outage lasted and how many calls failed. An unexpected error (not a connection or timeout
error) is not an outage: its caller logs it with its traceback.

Not thread-safe: one owner thread (or one asyncio loop) per instance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Outage:
    """The outage state of one caller of a dependency; see the module doc."""

    def __init__(self, what: str, log: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        """`what` names the caller in the log lines, e.g. `heartbeat of decode-0`."""
        self._what, self._log, self._clock = what, log, clock
        self._since_s: float | None = None  # clock time of the first failure of this outage
        self._failures = 0  # failed calls in this outage
        self.num_outages = 0  # outages begun since construction

    @property
    def what(self) -> str:
        return self._what

    @property
    def down(self) -> bool:
        """True from a failure until the next success."""
        return self._since_s is not None

    def failed(self, exc: BaseException, detail: str = "") -> bool:
        """Report a failed call; True if it began an outage (and was logged)."""
        self._failures += 1
        if self._since_s is not None:
            return False
        self._since_s = self._clock()
        self.num_outages += 1
        self._log.warning("%s: Redis unreachable (%s)%s", self._what, exc, f"; {detail}" if detail else "")
        return True

    def ok(self) -> float | None:
        """Report a successful call; the outage's length in seconds if it ended one (logged)."""
        if self._since_s is None:
            return None
        lasted_s = self._clock() - self._since_s
        self._log.warning(
            "%s: Redis reachable again after %.1f s (%d failed call(s))", self._what, lasted_s, self._failures
        )
        self._since_s, self._failures = None, 0
        return lasted_s
