"""loadtest metrics: exact TTFT/TPOT/ITL/E2E per record, exact percentiles (numpy's linear
method), throughput, errors by kind, and goodput against an SLO, on synthetic timings."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.loadtest.metrics import LatencyStats, percentile, summarize
from tandem.loadtest.record import ErrorKind, RequestRecord
from tandem.loadtest.slo import SLO


def record(
    request_id: str,
    start_s: float,
    token_times_s: tuple[float, ...],
    end_s: float,
    output_tokens: int,
    prompt_tokens: int = 10,
    error: ErrorKind | None = None,
    http_status: int | None = 200,
) -> RequestRecord:
    return RequestRecord(
        request_id=request_id,
        start_s=start_s,
        end_s=end_s,
        token_times_s=token_times_s,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        error=error,
        http_status=http_status,
    )


# Binary-exact timings, so every expected value below is exact.
A = record("a", 0.0, (0.125, 0.25, 0.375, 0.5), 0.5, output_tokens=4, prompt_tokens=10)
B = record("b", 1.0, (1.25, 1.75), 2.0, output_tokens=2, prompt_tokens=20)
C = record("c", 2.0, (2.5,), 2.5, output_tokens=1, prompt_tokens=30)
D = record("d", 3.0, (), 3.0, output_tokens=0, error=ErrorKind.HTTP_5XX, http_status=503)
E = record("e", 3.0, (3.5,), 4.0, output_tokens=1, error=ErrorKind.TIMEOUT)
RUN = (A, B, C, D, E)


def test_record_derived_latencies() -> None:
    assert (A.ttft_s, A.e2e_s, A.tpot_s, A.itl_gaps_s) == (0.125, 0.5, 0.125, (0.125, 0.125, 0.125))
    assert (B.ttft_s, B.e2e_s, B.tpot_s, B.itl_gaps_s) == (0.25, 1.0, 0.75, (0.5,))
    # One output token: TPOT is undefined, there is no gap.
    assert (C.first_token_s, C.ttft_s, C.tpot_s, C.itl_gaps_s) == (2.5, 0.5, None, ())
    assert (D.first_token_s, D.ttft_s, D.tpot_s, D.e2e_s, D.ok) == (None, None, None, 0.0, False)


def test_record_round_trips_through_dict() -> None:
    for original in RUN:
        assert RequestRecord.from_dict(original.to_dict()) == original
    assert D.to_dict()["error"] == "http_5xx"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"end_s": -1.0}, "is before start_s"),
        ({"token_times_s": (0.5, 0.25)}, "non-decreasing"),
        ({"token_times_s": (2.0,)}, "non-decreasing"),
        ({"output_tokens": -1}, "must be >= 0"),
        ({"request_id": ""}, "non-empty"),
        ({"start_s": float("nan")}, "must be finite"),
    ],
)
def test_record_rejects_inconsistent_timings(kwargs: dict, message: str) -> None:
    base = {
        "request_id": "x",
        "start_s": 0.0,
        "end_s": 1.0,
        "token_times_s": (0.5,),
        "prompt_tokens": 1,
        "output_tokens": 1,
    }
    with pytest.raises(ValueError, match=message):
        RequestRecord(**{**base, **kwargs})


def test_percentile_is_linear_interpolation() -> None:
    assert percentile([0.125, 0.25, 0.5], 50) == 0.25
    assert percentile([0.5, 0.25, 0.125], 90) == pytest.approx(0.45, abs=1e-15)
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0], 100) == 2.0
    values = np.random.default_rng(0).exponential(size=101).tolist()
    for p in (0.0, 12.5, 50.0, 90.0, 99.0, 100.0):
        assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)), rel=1e-12)
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"within \[0, 100\]"):
        percentile([1.0], 101)


def test_summary_latency_percentiles_exact() -> None:
    summary = summarize(RUN, duration_s=4.0)
    approx = pytest.approx
    # TTFT of the completed requests: 125, 250, 500 ms.
    assert summary.ttft == LatencyStats(
        count=3, mean_ms=approx(875 / 3), p50_ms=250.0, p90_ms=approx(450.0), p99_ms=approx(495.0)
    )
    # TPOT: A 125 ms, B 750 ms; C (one token) has none.
    assert summary.tpot == LatencyStats(
        count=2, mean_ms=437.5, p50_ms=437.5, p90_ms=approx(687.5), p99_ms=approx(743.75)
    )
    # ITL gaps pooled: 125, 125, 125 (A) and 500 (B).
    assert summary.itl == LatencyStats(
        count=4, mean_ms=218.75, p50_ms=125.0, p90_ms=approx(387.5), p99_ms=approx(488.75)
    )
    # E2E: 500, 1000, 500 ms.
    assert summary.e2e == LatencyStats(
        count=3, mean_ms=approx(2000 / 3), p50_ms=500.0, p90_ms=approx(900.0), p99_ms=approx(990.0)
    )


def test_summary_counts_and_throughput() -> None:
    summary = summarize(RUN, duration_s=4.0)
    assert (summary.num_requests, summary.num_completed, summary.num_errors) == (5, 3, 2)
    assert summary.errors_by_kind == ((ErrorKind.HTTP_5XX, 1), (ErrorKind.TIMEOUT, 1))
    assert (summary.prompt_tokens, summary.output_tokens) == (60, 7)
    assert summary.request_throughput_rps == 0.75
    assert summary.output_throughput_tps == 1.75
    assert summary.prompt_throughput_tps == 15.0
    assert (summary.slo, summary.num_good, summary.goodput_fraction, summary.goodput_rps) == (None, None, None, None)
    data = summary.to_dict()
    assert data["errors_by_kind"] == {"http_5xx": 1, "timeout": 1}
    assert data["ttft"]["p50_ms"] == 250.0


@pytest.mark.parametrize(
    ("slo_text", "good_ids"),
    [
        ("ttft=300,tpot=200", {"a"}),  # B misses TPOT (750 ms), C misses TTFT (500 ms)
        ("ttft=500", {"a", "b", "c"}),  # bounds are inclusive
        ("tpot=100", {"c"}),  # A, B too slow; C has one token: TPOT holds vacuously
        ("e2e=600", {"a", "c"}),
        ("ttft=1", set()),
    ],
)
def test_goodput(slo_text: str, good_ids: set[str]) -> None:
    slo = SLO.parse(slo_text)
    assert {r.request_id for r in RUN if slo.met_by(r)} == good_ids
    summary = summarize(RUN, duration_s=4.0, slo=slo)
    assert summary.num_good == len(good_ids)
    assert summary.goodput_fraction == len(good_ids) / 5
    assert summary.goodput_rps == len(good_ids) / 4.0
    assert summary.to_dict()["slo"] == slo_text


def test_failed_requests_never_meet_the_slo() -> None:
    assert not SLO(e2e_ms=10_000.0).met_by(E)


def test_summary_of_no_requests() -> None:
    summary = summarize([], duration_s=1.0, slo=SLO(ttft_ms=1.0))
    assert (summary.num_requests, summary.request_throughput_rps, summary.goodput_fraction) == (0, 0.0, 0.0)
    assert summary.ttft == LatencyStats(count=0, mean_ms=None, p50_ms=None, p90_ms=None, p99_ms=None)
    with pytest.raises(ValueError, match="positive duration_s"):
        summarize([], duration_s=0.0)


def test_slo_parse() -> None:
    assert SLO.parse("ttft=200,tpot=50") == SLO(ttft_ms=200.0, tpot_ms=50.0)
    assert SLO.parse(" tpot = 12.5 , e2e=1000") == SLO(tpot_ms=12.5, e2e_ms=1000.0)
    assert str(SLO.parse("tpot=12.5,ttft=200")) == "ttft=200,tpot=12.5"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Bad SLO item"),
        ("ttft", "expected key=milliseconds"),
        ("ttft=", "expected key=milliseconds"),
        ("itl=5", "Unknown SLO key 'itl'.*known keys: ttft, tpot, e2e"),
        ("ttft=1,ttft=2", "given twice"),
        ("ttft=fast", "must be a number of milliseconds"),
        ("ttft=-5", "positive number of milliseconds"),
        ("ttft=inf", "positive number of milliseconds"),
    ],
)
def test_slo_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SLO.parse(text)


def test_slo_needs_an_objective() -> None:
    with pytest.raises(ValueError, match="at least one objective"):
        SLO()
