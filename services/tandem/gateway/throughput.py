"""Measured rates of this gateway's requests: how fast its queue drains (for admission).

A drain rate must say what the pools can do, not how much was asked of them: two requests in
ten quiet seconds say nothing about how fast thirty-two would start. So `RateMeter` divides the
amount of its events in the last `window_s` seconds by its *busy* seconds in that window, the
time during which there was something to drain (`set_busy`), not by the window's length.
Without that, a burst after a quiet spell met a rate of a fraction of a request per second
and was refused (503) while the pool idled.

A rate is unknown (None) until the window holds at least `MIN_EVENTS` events and at least
`MIN_SPAN_S` busy seconds: one or two completions say nothing about a pool's throughput.
Memory is bounded by the event rate times the window, and at most `MAX_EVENTS` events and
`MAX_EVENTS` busy intervals (the oldest are dropped first).

`Throughput` holds the three meters admission reads: first tokens (requests started per
second) and prompt tokens started per second, busy while a request waits for its first token;
and requests finished per second, busy while a request is in flight. Owned by the gateway's
`AdmissionController`, which reports its counts with `Throughput.counts`; called on the event
loop only (not thread-safe).
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
        self._busy_since: float | None = None  # None: idle now
        self._busy: collections.deque[tuple[float, float]] = collections.deque()  # closed (begin, end)
        self._busy_total = 0.0  # seconds of the closed intervals in `_busy`

    def add(self, amount: float = 1.0) -> None:
        now = self._clock()
        self._expire(now)
        if len(self._events) == self._events.maxlen:
            self._total -= self._events[0][1]
        self._events.append((now, amount))
        self._total += amount

    def set_busy(self, busy: bool) -> None:
        """Whether there is something to drain from now on (repeating a state is a no-op)."""
        now = self._clock()
        if busy and self._busy_since is None:
            self._busy_since = now
        elif not busy and self._busy_since is not None:
            if len(self._busy) == MAX_EVENTS:
                begin, end = self._busy.popleft()
                self._busy_total -= end - begin
            self._busy.append((self._busy_since, now))
            self._busy_total += now - self._busy_since
            self._busy_since = None
            self._expire(now)

    def busy_seconds(self) -> float:
        """Busy seconds within the window, up to now (O(1): only the oldest interval can
        reach past the window's start)."""
        now = self._clock()
        self._expire(now)
        start = now - self.window_s
        seconds = self._busy_total
        if self._busy and self._busy[0][0] < start:
            seconds -= start - self._busy[0][0]
        if self._busy_since is not None:
            seconds += now - max(self._busy_since, start)
        return seconds

    def rate(self) -> float | None:
        """Amount per busy second over the window; None while too few events or too little
        busy time are known."""
        self._expire(self._clock())
        if len(self._events) < MIN_EVENTS:
            return None
        busy_s = self.busy_seconds()
        if busy_s < MIN_SPAN_S:
            return None
        return self._total / busy_s

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._total -= self._events.popleft()[1]
        if not self._events:
            self._total = 0.0  # no float drift left behind
        while self._busy and self._busy[0][1] < now - self.window_s:
            begin, end = self._busy.popleft()
            self._busy_total -= end - begin
        if not self._busy:
            self._busy_total = 0.0


class Throughput:
    """Requests started (first token) and finished per second, and prompt tokens started per
    second, each per second of having something to drain (see the module docstring)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.starts = RateMeter(window_s, clock)
        self.start_tokens = RateMeter(window_s, clock)
        self.finishes = RateMeter(window_s, clock)

    def counts(self, waiting: int, inflight: int) -> None:
        """The controller's counts after a change: starts drain while `waiting` > 0, finishes
        while `inflight` > 0."""
        self.starts.set_busy(waiting > 0)
        self.start_tokens.set_busy(waiting > 0)
        self.finishes.set_busy(inflight > 0)

    def started(self, num_prompt_tokens: int) -> None:
        self.starts.add()
        self.start_tokens.add(num_prompt_tokens)

    def finished(self) -> None:
        self.finishes.add()
