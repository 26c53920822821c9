"""Aggregate metrics of a benchmark run: latency percentiles, throughput and goodput.

Percentiles use linear interpolation between closest ranks, numpy's default method
(`numpy.percentile(..., method="linear")`): for the sorted values x[0..n-1] and a percentile p,
the rank is h = (n - 1) * p / 100 and the result is x[floor(h)] + (h - floor(h)) *
(x[floor(h) + 1] - x[floor(h)]). It is implemented here in plain Python so that results do
not depend on a numpy version.

Which requests count where:
- latency statistics (TTFT, TPOT, ITL, E2E) use successful requests only; TPOT skips requests
  with fewer than 2 output tokens; ITL pools the gaps of every successful request;
- request throughput = successful requests / duration_s; output-token throughput = output
  tokens of successful requests / duration_s (prompt throughput alike);
- goodput = requests that meet the SLO (failed requests never do): `goodput_fraction` is their
  share of all requests, `goodput_rps` their number / duration_s;
- mean requests in flight (`mean_in_flight`) = sum of every request's E2E / duration_s, failed
  ones included (they held a slot too): the concurrency an open-loop run actually reached.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tandem.loadtest.record import ErrorKind, RequestRecord
from tandem.loadtest.slo import SLO
from tandem.sim.results import percentile  # the simulator reports the same percentiles

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True)
class LatencyStats:
    """Count, mean and p50/p90/p99 of one latency metric, in milliseconds (None when count=0)."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, values_s: Sequence[float]) -> LatencyStats:
        """Statistics of `values_s` (seconds), reported in milliseconds."""
        if not values_s:
            return cls(count=0, mean_ms=None, p50_ms=None, p90_ms=None, p99_ms=None)
        p50, p90, p99 = (percentile(values_s, p) * 1000.0 for p in PERCENTILES)
        return cls(
            count=len(values_s), mean_ms=sum(values_s) / len(values_s) * 1000.0, p50_ms=p50, p90_ms=p90, p99_ms=p99
        )


@dataclass(frozen=True)
class Summary:
    """Everything a report shows about one run. Built by `summarize()`; immutable.

    `errors_by_kind` lists (kind, count) pairs in `ErrorKind` order, only kinds that occurred.
    The goodput fields are None when the run had no SLO.
    """

    duration_s: float
    num_requests: int
    num_completed: int
    num_errors: int
    errors_by_kind: tuple[tuple[ErrorKind, int], ...]
    prompt_tokens: int
    output_tokens: int
    request_throughput_rps: float
    prompt_throughput_tps: float
    output_throughput_tps: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    slo: SLO | None
    num_good: int | None
    goodput_fraction: float | None
    goodput_rps: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (error kinds and the SLO as strings)."""
        data = asdict(self)
        data["errors_by_kind"] = {kind.value: count for kind, count in self.errors_by_kind}
        data["slo"] = None if self.slo is None else str(self.slo)
        return data


def mean_in_flight(records: Sequence[RequestRecord], duration_s: float) -> float:
    """Time-averaged number of requests in flight over a run of `duration_s` seconds (> 0).

    The integral of in-flight requests over time is the sum of their E2E latencies (Little's law).
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"mean_in_flight() needs a positive duration_s, got {duration_s!r}.")
    return sum(record.e2e_s for record in records) / duration_s


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO | None = None) -> Summary:
    """Aggregate `records` of a run that lasted `duration_s` seconds (> 0) against `slo`."""
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"summarize() needs a positive duration_s, got {duration_s!r}.")
    completed = [record for record in records if record.ok]
    error_counts = Counter(record.error for record in records if record.error is not None)
    prompt_tokens = sum(record.prompt_tokens for record in completed)
    output_tokens = sum(record.output_tokens for record in completed)
    num_good = None if slo is None else sum(1 for record in records if slo.met_by(record))
    return Summary(
        duration_s=duration_s,
        num_requests=len(records),
        num_completed=len(completed),
        num_errors=len(records) - len(completed),
        errors_by_kind=tuple((kind, error_counts[kind]) for kind in ErrorKind if error_counts[kind]),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        request_throughput_rps=len(completed) / duration_s,
        prompt_throughput_tps=prompt_tokens / duration_s,
        output_throughput_tps=output_tokens / duration_s,
        ttft=LatencyStats.of([r.ttft_s for r in completed if r.ttft_s is not None]),
        tpot=LatencyStats.of([r.tpot_s for r in completed if r.tpot_s is not None]),
        itl=LatencyStats.of([gap for r in completed for gap in r.itl_gaps_s]),
        e2e=LatencyStats.of([r.e2e_s for r in completed]),
        slo=slo,
        num_good=num_good,
        goodput_fraction=None if num_good is None else (num_good / len(records) if records else 0.0),
        goodput_rps=None if num_good is None else num_good / duration_s,
    )
