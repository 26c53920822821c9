"""Calibrating the prefill fit on real runs: selection, the wait, and exact recovery."""

from __future__ import annotations

import pytest

from tandem.sim.distserve_calibrate import (
    Sample,
    TimedRequest,
    alone_in_step,
    empty_system,
    fit_prefill,
    parse_timed,
    relative_errors,
    samples,
    wait_ms,
)
from tandem.sim.distserve_profile import StepFit

KNOWN = (24.0, 0.09, 2.5e-5)
DECODE = StepFit(
    prefill=(0.0, 0.0, 0.0), decode_small=(20.0, 0.01, 1.0), decode_large=(5.0, 0.01, 2.0), large_batch_from=3
)


def _step_ms(prompt: int) -> float:
    """The synthetic engine's prefill step plus the Ray term the cost model adds."""
    a, b, c = KNOWN
    return a + b * prompt + c * prompt**2 + 2.0 + 1e-4 * prompt


def test_fit_recovers_known_coefficients_from_synthetic_timings_exactly() -> None:
    run = []
    for i, prompt in enumerate((12, 300, 700, 1100, 1500, 1900)):  # each issued into an empty system
        issue = 10.0 * i
        first = issue + _step_ms(prompt) / 1e3
        run.append(TimedRequest(prompt, 4, issue, first, first + 0.09, 0.03))
    assert empty_system(run) == alone_in_step(run) == [0, 1, 2, 3, 4, 5]
    points = samples(run, empty_system, DECODE)
    assert fit_prefill(points) == pytest.approx(KNOWN, rel=1e-9)
    assert relative_errors(fit_prefill(points), points) == pytest.approx([0.0] * 6, abs=1e-9)


def test_fit_keeps_coefficients_nonnegative() -> None:
    # exactly 50 - 0.01 L: the best nonnegative fit drops the slope and the square
    points = [Sample(length, 50.0 - 0.01 * length) for length in (100, 1000, 2000)]
    a, b, c = fit_prefill(points)
    assert (b, c) == (0.0, 0.0)
    # one constant minimising sum((a - t) / t)^2: a = sum(1/t) / sum(1/t^2)
    inverse = [1 / p.target_ms for p in points]
    assert a == pytest.approx(sum(inverse) / sum(x * x for x in inverse), rel=1e-12)


def test_fit_refuses_fewer_than_three_distinct_lengths() -> None:
    with pytest.raises(ValueError, match="^2 distinct prompt lengths cannot determine 3 coefficients$"):
        fit_prefill([Sample(55, 70.0), Sample(829, 141.0), Sample(55, 42.0)])


def test_selections_and_the_decode_wait() -> None:
    run = [
        TimedRequest(100, 10, 0.0, 0.05, 1.0, 0.1),  # empty system
        TimedRequest(200, 5, 0.5, 0.6, 1.2, 0.1),  # #0 decoding, 100 + 1 + 4 tokens: alone in its step
        TimedRequest(300, 5, 0.8, 0.9, 1.3, 0.1),  # #3 issued before its first token
        TimedRequest(400, 5, 0.85, 0.95, 1.4, 0.1),  # #2 still waiting for its first token
        TimedRequest(50, 5, 1.27, 1.3, 1.5, 0.1),  # #2 (304 tokens) and #3 (404) decoding: alone
        TimedRequest(60, 2, 2.0, 2.03, 2.1, 0.07),  # empty system again
    ]
    assert empty_system(run) == [0, 5]
    assert alone_in_step(run) == [0, 1, 4, 5]
    assert wait_ms(run, 0, DECODE) == 0.0
    # one sequence of 105 tokens, small-batch fit: (20 + 0.01 x 105 + 1 x 1 + 2 + 1e-4 x 105) / 2
    assert wait_ms(run, 1, DECODE) == pytest.approx((20 + 1.05 + 1 + 2 + 0.0105) / 2, rel=1e-12)
    # two sequences, 708 tokens: (20 + 7.08 + 1 x 2 + 2 + 0.0708) / 2
    assert wait_ms(run, 4, DECODE) == pytest.approx((20 + 7.08 + 2 + 2 + 0.0708) / 2, rel=1e-12)
    assert wait_ms(run, 4, None) == 0.0
    points = samples(run, alone_in_step, DECODE)
    assert [p.prompt for p in points] == [100, 200, 50, 60]
    assert points[1].target_ms == pytest.approx(100.0 - wait_ms(run, 1, DECODE) - 2.0 - 0.02, rel=1e-12)


def test_parse_timed_is_relative_to_the_first_issue_and_never_evaluates_code() -> None:
    row = (
        "{{'prompt_len': {}, 'output_len': 3, 'issue_time': {}, 'first_token_time': {}, 'complete_time': {}, "
        "'ttft_ms': 0.0, 'tpot_ms': 20.0, 'latency_ms': 0.0}}"
    )
    text = "[" + row.format(80, 11.0, 11.1, 11.3) + ", " + row.format(50, 10.0, 10.2, 10.6) + "]\n{summary}\n"
    assert parse_timed(text) == (
        TimedRequest(50, 3, 0.0, pytest.approx(0.2), pytest.approx(0.6), 0.02),
        TimedRequest(80, 3, 1.0, pytest.approx(1.1), pytest.approx(1.3), 0.02),
    )
    with pytest.raises(ValueError, match="malformed node"):
        parse_timed("__import__('os').system('true')\n")
