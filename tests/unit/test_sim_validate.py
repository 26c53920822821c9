"""sim_validate's serving correction: the served decode steps measured by the probes set the
step's fixed and per-sequence terms, the rest of the TTFT is the gateway's latency, and a
probe's decode step leaves out the gaps another probe's prefill can have fallen into; the
simulated requests arrive when the real ones were sent."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.suite.sim_probes import ProbeRound, Serving, decode_step_s, drift_note
from tandem.loadtest.suite.sim_validate import segments_of, sent_trace
from tandem.sim.calibrate import CalibratedCostModel, Coefficients
from tandem.sim.types import StepShape, TraceRequest

# the engine's fit; its fixed and per-sequence terms are replaced by the served ones
ENGINE = CalibratedCostModel("m", Coefficients(0.007, 1e-4, 0.0005, 1e-7, 1e-6), kv_bytes=4096)


def test_probes_scale_the_engine_terms_and_set_the_fixed_and_per_sequence_terms() -> None:
    # the engine prefills 64, 128 and 256 tokens in 64e-4 + 1e-7 x 2080 = 6.608 ms, 12.8 +
    # 0.8256 = 13.6256 ms and 25.6 + 3.2896 = 28.8896 ms of token and attention terms; TTFTs
    # alone of 8 ms + 1.5 times those lie on one line: the terms are scaled by 1.5, and the
    # 8 ms are the fixed step (3 ms, from the decode steps below) and the gateway (5 ms)
    ttfts = {64: 0.017912, 128: 0.0284384, 256: 0.0513344}
    # a probe decodes at context 64 + 48 / 2 = 88: b x (1.5e-4 + 88 x 1.5e-6) = 0.282 ms per
    # sequence; steps of 0.003 + 0.001182 b (b = 1, 2, 4) leave 0.003 + 0.0009 b to the served
    # fixed and per-sequence terms, on one line: the fit is exact
    steps = {1: 0.004182, 2: 0.005364, 4: 0.007728}
    served, gateway_s = Serving(steps, ttfts).apply(ENGINE)
    assert dataclasses.astuple(served.coefficients) == pytest.approx((0.003, 1.5e-4, 0.0009, 1.5e-7, 1.5e-6), rel=1e-9)
    for batch, seconds in steps.items():
        step = StepShape(decode_seqs=batch, decode_context_tokens=88 * batch)
        assert served.step_seconds(step) == pytest.approx(seconds, rel=1e-9)
    assert gateway_s == pytest.approx(0.005, rel=1e-9)


def test_probes_that_leave_nothing_to_fit_are_refused() -> None:
    ttfts = {64: 0.02, 256: 0.04}
    with pytest.raises(ValueError, match=r"^the probes' decode steps \{1: 0\.0001, 2: 0\.004\} leave nothing"):
        Serving({1: 0.0001, 2: 0.004}, ttfts).apply(ENGINE)
    with pytest.raises(ValueError, match=r"^the probes' decode steps \{1: 0\.004\} leave nothing"):
        Serving({1: 0.004}, ttfts).apply(ENGINE)
    for no_slope in ({64: 0.04, 256: 0.03}, {64: 0.04}):
        with pytest.raises(ValueError, match=rf"^the probes' TTFTs {re.escape(str(no_slope))} give no prefill cost"):
            Serving({1: 0.004, 2: 0.005}, no_slope).apply(ENGINE)


def _record(rid: str, start: float, tokens: tuple[float, ...]) -> RequestRecord:
    return RequestRecord(rid, start, tokens[-1], tokens, prompt_tokens=64, output_tokens=len(tokens))


def test_a_probes_decode_step_skips_gaps_that_overlap_another_probes_wait() -> None:
    a = _record("a", 0.0, (1.0, 1.1, 1.2, 1.4))
    b = _record("b", 1.15, (1.3, 1.35, 1.45))  # waits 1.15-1.3 for its first token: its prefill
    alone = _record("c", 2.0, (2.1,))  # one token: no gap
    # a: 1.0-1.1 is clean; 1.1-1.2 and 1.2-1.4 overlap b's wait. b: both gaps are after a's wait
    assert decode_step_s([a, b, alone]) == pytest.approx([0.1, 0.075], rel=1e-12)
    # its own wait never counts against a request
    assert decode_step_s([a]) == pytest.approx([0.4 / 3], rel=1e-12)


def test_the_simulated_trace_arrives_when_the_load_generator_sent_each_request() -> None:
    requests = [WorkloadRequest(f"r{i}", (1,) * 4, 8) for i in range(3)]
    trace = [TraceRequest(0.1 * i, 4 + i, 8) for i in range(3)]
    # r0 was due at 0 but went out at 0.15, after r1 (due and sent at 0.1)
    records = [_record("r1", 0.1, (0.2,)), _record("r0", 0.15, (0.3,)), _record("r2", 0.2, (0.4,))]
    assert sent_trace(trace, requests, records) == (
        TraceRequest(0.1, 5, 8),
        TraceRequest(0.15, 4, 8),
        TraceRequest(0.2, 6, 8),
    )
    with pytest.raises(ValueError, match=r"^the real run has no record of \['r2'\] \(3 traced, 3 sent\)$"):
        sent_trace(trace, requests, records[:2])


def _round(gap: float, ttft: float) -> ProbeRound:
    """A probe round whose batch-1 probe decodes with a mean gap of 1.5 x `gap` (its batch-2
    and batch-4 probes twice and four times that) and whose prefill probes take `ttft` + 64 /
    256 x (0, 2, 4) ms at each prompt length."""
    decodes = {b: [_record("p", 0.0, (1.0, 1.0 + b * gap, 1.0 + 3 * b * gap))] for b in (1, 2, 4)}
    ttfts = {n: [ttft + k * n * 2e-3 / 256 for k in range(3)] for n in (64, 128, 192, 256)}
    return ProbeRound(decodes, ttfts)


def test_a_segment_is_fitted_on_the_medians_of_the_rounds_on_either_side() -> None:
    serving = Serving.of([_round(0.002, 0.030), _round(0.004, 0.040)])
    # batch b: one probe per round, mean gaps 1.5 b x 2 ms and 1.5 b x 4 ms: the median of two is their mean
    assert serving.decode_step_s == pytest.approx({1: 0.0045, 2: 0.009, 4: 0.018}, rel=1e-12)
    # 256 tokens: 30, 32, 34 and 40, 42, 44 ms: the median of six is (34 + 40) / 2
    assert serving.ttft_alone_s == pytest.approx({64: 0.0355, 128: 0.036, 192: 0.0365, 256: 0.037}, rel=1e-12)


def test_the_run_is_split_into_consecutive_segments_of_near_equal_size() -> None:
    requests = [WorkloadRequest(f"r{i}", (1,), 2) for i in range(8)]
    assert [[r.request_id for r in s] for s in segments_of(requests, 3)] == [
        ["r0", "r1"],
        ["r2", "r3", "r4"],
        ["r5", "r6", "r7"],
    ]
    assert segments_of(requests, 1) == [requests]
    with pytest.raises(ValueError, match=r"^cannot split 8 requests into 9 segments$"):
        segments_of(requests, 9)


def test_the_drift_note_compares_the_probe_rounds() -> None:
    assert drift_note([_round(0.002, 0.030), _round(0.004, 0.040), _round(0.003, 0.050)]) == (
        "Probe rounds, before, between and after the run's segments: served decode step at batch 1 "
        "3.00 / 6.00 / 4.50 ms; TTFT alone at 256 prompt tokens 32.00 / 42.00 / 52.00 ms."
    )
