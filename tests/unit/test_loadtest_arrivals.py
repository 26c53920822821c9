"""loadtest arrivals: open-loop schedules are deterministic and have exact inter-arrival
properties; closed loop and rates are validated."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.loadtest.arrivals import ArrivalPattern, ClosedLoop, OpenLoop


def test_constant_is_exactly_evenly_spaced() -> None:
    assert OpenLoop(4.0, ArrivalPattern.CONSTANT).send_times_s(5, seed=0) == (0.0, 0.25, 0.5, 0.75, 1.0)


def test_bursty_sends_bursts_at_the_mean_rate() -> None:
    times = OpenLoop(2.0, ArrivalPattern.BURSTY, burst_size=3).send_times_s(7, seed=0)
    assert times == (0.0, 0.0, 0.0, 1.5, 1.5, 1.5, 3.0)


def test_poisson_is_deterministic_with_exponential_gaps() -> None:
    shape = OpenLoop(10.0)
    times = shape.send_times_s(20_001, seed=1)
    assert times == shape.send_times_s(20_001, seed=1)
    assert times != shape.send_times_s(20_001, seed=2)
    assert times[0] == 0.0
    gaps = np.diff(times)
    assert (gaps >= 0).all()
    # The exact gaps numpy's generator draws for this seed ...
    expected = np.random.default_rng(1).exponential(0.1, size=20_000)
    assert np.allclose(gaps, expected, rtol=0, atol=1e-12)
    # ... whose mean and coefficient of variation are those of an exponential (1/rate, 1).
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("pattern", list(ArrivalPattern))
def test_edge_counts(pattern: ArrivalPattern) -> None:
    assert OpenLoop(1.0, pattern).send_times_s(0, seed=0) == ()
    assert OpenLoop(1.0, pattern).send_times_s(1, seed=0) == (0.0,)


def test_validation() -> None:
    with pytest.raises(ValueError, match="positive number of requests per second"):
        OpenLoop(0.0)
    with pytest.raises(ValueError, match="burst_size must be >= 1"):
        OpenLoop(1.0, ArrivalPattern.BURSTY, burst_size=0)
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        ClosedLoop(0)
    with pytest.raises(ValueError, match="num_requests must be >= 0"):
        OpenLoop(1.0).send_times_s(-1, seed=0)
    assert OpenLoop(4.0).describe() == "poisson @ 4 req/s"
    assert ClosedLoop(8).describe() == "concurrency 8"
