"""An adaptive concurrency limit driven by the measured TTFT (AIMD, in the spirit of Netflix's
concurrency-limits and of TCP's congestion window). Admission (admission.py) refuses a request
when this gateway's in-flight count has reached the limit.

What the limit bounds, and why: this gateway's requests in flight (admitted, not yet ended).
A request's TTFT is its wait in a worker's queue plus the step that prefills it, and a step's
time grows with the running batch. Both are made of in-flight requests: a bound on the requests
not yet started alone lets the batch (every started request, for its whole decode) grow and
slow every step, which no queue length shows; a bound on the running streams alone lets the
queues grow. The in-flight count is their sum. By Little's law (in flight = throughput x
latency), past the knee where the pools are saturated a larger limit adds only latency, and
the measured TTFT says where that knee is.

The knee is where the pools' batches are full: a request admitted past it does not join a
batch but waits in a worker's queue until a running request ends, a wait of up to a whole
decode, while a request below it waits at most for the step in progress. So a sample carries,
where the pools report it, the request's queue wait (the time until a batch took it: the decode
worker's admission wait for a local prefill, the prefill worker's queue for a disaggregated
one). A longer step of a fuller batch lengthens every TTFT but queues nobody: that is the
throughput the batch buys, not congestion, and it does not stop the limit's growth.

The algorithm (`observe`: one sample per admitted request, its admission time, its TTFT, or a
lower bound of it for a request still waiting past the target, and its queue wait if known):
1. A sample of a request admitted before the last decrease is stale (it measured a larger
   limit than the current one): ignored, as TCP backs off once per round trip.
2. A fresh sample that queued (its queue wait was over `QUEUED_SHARE` of its TTFT: more than
   twice everything else its first token took; the controller reports a request still
   waiting past the target as all queue) says the limit is past the knee: at once
   `limit = max(1, floor(limit * backoff))`, every request admitted until now becomes stale,
   and the window empties. At once, because the signal is late already: the batch a request
   past the knee waits for tends to have started together (it filled when the previous one
   ended) and to end together, so that request waits up to a whole decode, and the requests
   admitted meanwhile queue behind it. Multiplicatively, because each probe past the knee
   costs such a wait: the limit comes back to the knee by one per window, so it probes
   rarely.
3. Other fresh samples fill a window of `window` samples. When it is full, its `quantile`
   (nearest rank) is compared with the target:
   - over it: `limit = max(1, floor(limit * backoff))`, and every request admitted until now
     becomes stale;
   - within it, and the limit was tested (some sample's request was admitted into its last
     slot: its in-flight count is at least the limit): `limit = min(max_limit, limit + 1)`.
     So each increase waits for a request admitted at the limit to start, as TCP grows its
     window only when the window is what limits it. (Testing at half the limit let the limit
     climb on the samples of requests below the knee while those admitted past it had not
     started yet: four or five past the knee, they waited a second for their first token.);
   - within it, untested: unchanged (an idle gateway does not grow a limit it never uses).
   The window empties after each decision.

The knee: the limit at the last queued sample. From one below it, the limit grows only after
`KNEE_WINDOWS` windows in a row within the target and tested (instead of one), as TCP CUBIC
lingers near the window of its last loss: the limit spends its time just below the knee and
probes past it rarely, since each probe costs its victims a wave's wait. A limit that grows
past the knee without a queued sample forgets it (the pools grew: normal growth again).

The TTFT target alone would let the limit probe past the knee for as long as the queued
requests stay under a tenth of the window, and those are the tail of the TTFT (its p99).

Pure and deterministic: times are given by the caller (the `AdmissionController`'s clock), so
a sequence of samples gives one exact trajectory of limits. Not thread-safe (event loop only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A sample queued when its queue wait was over this share of its TTFT (see the module docstring).
QUEUED_SHARE = 2 / 3
# Windows in a row, within the target and tested, for each increase from just below the knee.
KNEE_WINDOWS = 8


@dataclass(frozen=True)
class LimitConfig:
    """The adaptive limit of one gateway (see the module docstring); `AdmissionConfig.limit`."""

    adaptive: bool = field(
        default=True,
        metadata={"flag": "adaptive-limit", "help": "bound in-flight requests by a limit that follows the TTFT"},
    )
    ttft_target_s: float | None = field(
        default=None,
        metadata={"help": "the adaptive limit keeps this quantile of TTFT under it (default: half the TTFT budget)"},
    )
    initial: int = field(default=32, metadata={"flag": "limit-initial", "help": "the adaptive limit at start"})
    max_limit: int = field(default=1024, metadata={"flag": "limit-max", "help": "the adaptive limit's ceiling"})
    window: int = field(default=10, metadata={"flag": "limit-window", "help": "TTFT samples per limit decision"})
    quantile: float = field(
        default=0.9, metadata={"flag": "limit-quantile", "help": "the TTFT quantile held under the target"}
    )
    backoff: float = field(
        default=0.8, metadata={"flag": "limit-backoff", "help": "factor applied to the limit when TTFT is over"}
    )

    def __post_init__(self) -> None:
        if self.ttft_target_s is not None and not self.ttft_target_s > 0:
            raise ValueError(f"ttft_target_s must be > 0, got {self.ttft_target_s}")
        if self.initial < 1:
            raise ValueError(f"initial must be >= 1, got {self.initial}")
        if self.max_limit < self.initial:
            raise ValueError(f"max_limit must be >= initial ({self.initial}), got {self.max_limit}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if not 0 < self.backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {self.backoff}")


class ConcurrencyLimit:
    """The limit and its window of samples. Owned by the gateway's `AdmissionController`, which
    reads `limit` for every admission and feeds `observe` at every first token."""

    def __init__(self, config: LimitConfig, target_s: float) -> None:
        if not target_s > 0:
            raise ValueError(f"target_s must be > 0, got {target_s}")
        self.config = config
        self.target_s = target_s
        self.limit = config.initial
        self._window: list[float] = []  # TTFTs of fresh samples, seconds
        self._tested = False  # some sample in the window was admitted into the limit's last slot
        self._decreased_s = -math.inf  # requests admitted before this are stale
        self._knee: int | None = None  # the limit at the last queued sample (None: none yet)
        self._clean = 0  # windows in a row within the target and tested, just below the knee

    def observe(self, admitted_s: float, ttft_s: float, inflight: int, queue_s: float | None = None) -> int:
        """One request's sample: `admitted_s` when it was admitted (the caller's clock),
        `ttft_s` its time to first token (or how long it has waited, for one still waiting),
        `inflight` this gateway's in-flight count just after its admission (itself included),
        `queue_s` its wait in a worker's queue before a batch took it (None: not known).
        Returns the limit after it."""
        if ttft_s < 0 or inflight < 1 or (queue_s is not None and not queue_s >= 0):
            raise ValueError(
                "a sample needs ttft_s >= 0, inflight >= 1 and queue_s >= 0 or None, "
                f"got {ttft_s}, {inflight}, {queue_s}"
            )
        if admitted_s < self._decreased_s:
            return self.limit
        if queue_s is not None and queue_s > QUEUED_SHARE * ttft_s:
            self._knee = self.limit
            return self._decrease(max(1, math.floor(self.limit * self.config.backoff)), admitted_s + ttft_s)
        self._window.append(ttft_s)
        self._tested = self._tested or inflight >= self.limit
        if len(self._window) < self.config.window:
            return self.limit
        ranked = sorted(self._window)
        if ranked[math.ceil(self.config.quantile * len(ranked)) - 1] > self.target_s:
            return self._decrease(max(1, math.floor(self.limit * self.config.backoff)), admitted_s + ttft_s)
        if self._tested:
            self._grow()
        self._window.clear()
        self._tested = False
        return self.limit

    def _grow(self) -> None:
        """+ 1, but from just below the knee only after `KNEE_WINDOWS` such windows in a row;
        past the knee, the knee was not one (the pools grew): forgotten."""
        if self._knee is not None and self.limit >= self._knee - 1:
            self._clean += 1
            if self._clean < KNEE_WINDOWS:
                return
        self._clean = 0
        self.limit = min(self.config.max_limit, self.limit + 1)
        if self._knee is not None and self.limit > self._knee:
            self._knee = None

    def _decrease(self, limit: int, now_s: float) -> int:
        """The new limit; what was admitted before `now_s` is stale, the window starts over."""
        self.limit = limit
        self._decreased_s = now_s
        self._window.clear()
        self._tested = False
        self._clean = 0
        return limit
