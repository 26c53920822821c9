"""What a simulation run measured: per-request times, then the load generator's report figures.

Definitions (the same as `tandem.loadtest.metrics`, which sim may not import):
- TTFT: arrival to the first token; e2e: arrival to the last token;
- ITL: a request's mean gap between output tokens, (e2e - TTFT) / (output tokens - 1), for
  requests with at least two output tokens (the simulator skips through decode runs, so it
  does not keep every gap);
- percentiles by linear interpolation (numpy's default);
- throughput: output tokens and completed requests per second of the arrival span;
- goodput: completed requests whose TTFT and ITL both meet the SLO, per second;
- utilisation of a pool: the seconds its workers computed steps over the seconds they were up.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0 <= p <= 100) of `values` (sorted or not) by linear interpolation
    (numpy's default); the load generator's report uses it too.

    Raises ValueError on an empty sequence or p outside [0, 100].
    """
    if not values:
        raise ValueError("percentile() of an empty sequence is undefined.")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile p must be within [0, 100], got {p}.")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


@dataclass(frozen=True)
class Slo:
    """Latency targets of goodput: a request is good when TTFT <= ttft_s and ITL <= itl_s."""

    ttft_s: float
    itl_s: float

    def __post_init__(self) -> None:
        for name in ("ttft_s", "itl_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Latency:
    """p50/p90/p99 of one metric, in seconds (None when no request had it)."""

    count: int
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency:
        if not values:
            return cls(0, None, None, None)
        ordered = sorted(values)
        return cls(len(ordered), *(percentile(ordered, p) for p in PERCENTILES))


@dataclass(frozen=True)
class PoolUsage:
    """One pool: workers at the end, the most at once, and the busy fraction of its up time."""

    role: str
    num_workers_end: int
    max_workers: int
    utilisation: float


@dataclass(frozen=True)
class SimResult:
    num_requests: int
    num_completed: int
    num_failed: int  # no decode worker could take them
    duration_s: float  # span of the arrivals
    makespan_s: float  # until the last request finished
    ttft: Latency
    itl: Latency
    e2e: Latency
    output_tokens_per_s: float
    requests_per_s: float
    goodput_rps: float | None
    num_good: int | None
    pools: tuple[PoolUsage, ...]
    num_disaggregated: int
    num_local_prefill: int
    num_preemptions: int
    num_scale_changes: int
    num_events: int = field(compare=False)  # loop iterations (a decode run counts once)

    def attainment(self) -> float | None:
        """Share of all requests that met the SLO."""
        if self.num_good is None:
            return None
        return self.num_good / self.num_requests if self.num_requests else 0.0


class Records:
    """Per-request times, filled by the event loop (NaN: not reached)."""

    def __init__(self, num_requests: int) -> None:
        nan = array("d", [math.nan])
        self.arrival_s = nan * num_requests
        self.first_token_s = nan * num_requests
        self.finish_s = nan * num_requests
        self.output_tokens = array("q", [0]) * num_requests
        self.failed = 0

    def summary_times(self) -> tuple[list[float], list[float], list[float]]:
        """(TTFTs, ITLs, e2e latencies) of the completed requests."""
        ttft, itl, e2e = [], [], []
        for arrival, first, last, n in zip(self.arrival_s, self.first_token_s, self.finish_s, self.output_tokens):
            if math.isnan(last):
                continue
            ttft.append(first - arrival)
            e2e.append(last - arrival)
            if n > 1:
                itl.append((last - first) / (n - 1))
        return ttft, itl, e2e

    def num_good(self, slo: Slo) -> int:
        good = 0
        for arrival, first, last, n in zip(self.arrival_s, self.first_token_s, self.finish_s, self.output_tokens):
            if math.isnan(last) or first - arrival > slo.ttft_s:
                continue
            if n > 1 and (last - first) / (n - 1) > slo.itl_s:
                continue
            good += 1
        return good


def render(result: SimResult, title: str = "simulation") -> str:
    """The result as a Markdown table (the load generator's report layout)."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.1f}"

    lines = [
        f"## {title}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests | {result.num_requests} ({result.num_completed} completed, {result.num_failed} failed) |",
        f"| arrival span / makespan (s) | {result.duration_s:.1f} / {result.makespan_s:.1f} |",
    ]
    for name, lat in (("TTFT", result.ttft), ("ITL", result.itl), ("e2e", result.e2e)):
        lines.append(f"| {name} p50 / p90 / p99 (ms) | {ms(lat.p50_s)} / {ms(lat.p90_s)} / {ms(lat.p99_s)} |")
    lines.append(
        f"| throughput | {result.output_tokens_per_s:.1f} output tokens/s, {result.requests_per_s:.2f} req/s |"
    )
    attainment = result.attainment()
    if result.goodput_rps is not None and attainment is not None:
        lines.append(f"| goodput | {result.goodput_rps:.2f} req/s ({attainment:.1%} of requests) |")
    lines.append(f"| routing | {result.num_disaggregated} disaggregated, {result.num_local_prefill} local prefill |")
    lines.append(f"| preemptions / scale changes | {result.num_preemptions} / {result.num_scale_changes} |")
    for pool in result.pools:
        lines.append(
            f"| {pool.role} pool | {pool.num_workers_end} workers at the end (max {pool.max_workers}), "
            f"{pool.utilisation:.1%} busy |"
        )
    return "\n".join(lines)
