"""Arrivals: when the load generator sends each request.

Two shapes of load, as in `vllm bench serve` and GuideLLM:

- `OpenLoop`: requests are sent at precomputed times, whatever the server's state, at a mean
  `rate_rps`. `send_times_s(n, seed)` is pure: offsets in seconds from the run's start, first
  request at 0, non-decreasing.
    - `poisson`: exponential inter-arrival gaps with mean 1 / rate_rps;
    - `constant`: request i at exactly i / rate_rps;
    - `bursty`: bursts of `burst_size` requests sent at the same instant, burst j at exactly
      j * burst_size / rate_rps (same mean rate as `constant`).
- `ClosedLoop`: a fixed number of requests in flight; the next starts when one finishes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np


class ArrivalPattern(str, enum.Enum):
    """How open-loop send times are spaced."""

    POISSON = "poisson"
    CONSTANT = "constant"
    BURSTY = "bursty"


@dataclass(frozen=True)
class OpenLoop:
    """Send at a mean rate of `rate_rps` requests per second, spaced by `pattern`."""

    rate_rps: float
    pattern: ArrivalPattern = ArrivalPattern.POISSON
    burst_size: int = 8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_rps) and self.rate_rps > 0):
            raise ValueError(
                f"The request rate must be a positive number of requests per second, got {self.rate_rps!r}."
            )
        if self.burst_size < 1:
            raise ValueError(f"burst_size must be >= 1, got {self.burst_size}.")

    def send_times_s(self, num_requests: int, seed: int) -> tuple[float, ...]:
        """Send offsets (seconds from the run's start) of `num_requests` requests."""
        if num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {num_requests}.")
        if self.pattern is ArrivalPattern.CONSTANT:
            return tuple(i / self.rate_rps for i in range(num_requests))
        if self.pattern is ArrivalPattern.BURSTY:
            return tuple((i // self.burst_size) * self.burst_size / self.rate_rps for i in range(num_requests))
        gaps_s = np.random.default_rng(seed).exponential(1.0 / self.rate_rps, size=max(num_requests - 1, 0))
        return (0.0,) * min(num_requests, 1) + tuple(float(t) for t in np.cumsum(gaps_s))

    def describe(self) -> str:
        """A short label for reports, e.g. `poisson @ 4 req/s`."""
        return f"{self.pattern.value} @ {self.rate_rps:g} req/s"


@dataclass(frozen=True)
class ClosedLoop:
    """Keep exactly `concurrency` requests in flight (fewer only at the end of the run)."""

    concurrency: int

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}.")

    def describe(self) -> str:
        """A short label for reports, e.g. `concurrency 8`."""
        return f"concurrency {self.concurrency}"


LoadShape = OpenLoop | ClosedLoop
