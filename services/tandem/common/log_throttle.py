"""Warnings about what a peer sent, at most one line per key and interval.

A hostile or broken peer can send garbage as fast as the network allows (undecodable gRPC
requests, malformed Redis values); logging each one would let it fill the disk. Callers that
log such input own a `LogThrottle` and pass a key from a small, fixed set (the gRPC method, the
Redis key kind): the first line of a key is logged at once, later ones within `interval_s` are
counted and the count rides on the next line that is logged. Never a traceback. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class LogThrottle:
    def __init__(
        self, logger: logging.Logger, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # key -> (when last logged, lines suppressed since)

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log `message % args` as a warning unless `key` was logged less than `interval_s` ago;
        returns whether it was logged."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self._interval_s:
                self._last[key] = (last[0], last[1] + 1)
                return False
            self._last[key] = (now, 0)
        suppressed = 0 if last is None else last[1]
        if suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, suppressed)
        self._logger.warning(message, *args)
        return True
