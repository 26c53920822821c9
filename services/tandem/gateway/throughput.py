"""Measured rates of this gateway's requests: how fast its queue drains (for admission).

`RateMeter` keeps the events of the last `window_s` seconds (timestamp, amount) and answers
their rate per second. A rate is unknown (None) until the window holds at least
`MIN_EVENTS` events spread over at least `MIN_SPAN_S`: one or two completions say nothing
about a pool's throughput. Memory is bounded by the event rate times the window, and at most
`MAX_EVENTS` (the oldest are dropped first).

`Throughput` holds the three meters admission reads: first tokens (requests started per
second), prompt tokens started per second, and requests finished per second. Owned by the
gateway's `AdmissionController`; called on the event loop only (not thread-safe).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

MIN_EVENTS = 3
MIN_SPAN_S = 0.25
MAX_EVENTS = 100_000


class RateMeter:
    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._events: collections.deque[tuple[float, float]] = collections.deque(maxlen=MAX_EVENTS)
        self._total = 0.0

    def add(self, amount: float = 1.0) -> None:
        now = self._clock()
        self._expire(now)
        if len(self._events) == self._events.maxlen:
            self._total -= self._events[0][1]
        self._events.append((now, amount))
        self._total += amount

    def rate(self) -> float | None:
        """Amount per second over the window (or over the span since its oldest event, when
        that is shorter); None while too few events are known."""
        now = self._clock()
        self._expire(now)
        if len(self._events) < MIN_EVENTS:
            return None
        span_s = min(self.window_s, now - self._events[0][0])
        if span_s < MIN_SPAN_S:
            return None
        return self._total / span_s

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._total -= self._events.popleft()[1]
        if not self._events:
            self._total = 0.0  # no float drift left behind


class Throughput:
    """Requests started (first token) and finished per second, and prompt tokens started per second."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.starts = RateMeter(window_s, clock)
        self.start_tokens = RateMeter(window_s, clock)
        self.finishes = RateMeter(window_s, clock)

    def started(self, num_prompt_tokens: int) -> None:
        self.starts.add()
        self.start_tokens.add(num_prompt_tokens)

    def finished(self) -> None:
        self.finishes.add()
