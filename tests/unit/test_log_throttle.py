"""LogThrottle: one line per key and interval, the suppressed count on the next line."""

from __future__ import annotations

import logging

import pytest

from tandem.common.log_throttle import LogThrottle


def test_one_line_per_key_and_interval_with_the_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttle = LogThrottle(logging.getLogger("throttle-test"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="throttle-test"):
        assert throttle.warning("a", "bad %s", 1) is True
        assert throttle.warning("a", "bad %s", 2) is False
        assert throttle.warning("b", "other %s", 3) is True  # keys are throttled apart
        now[0] = 109.9
        assert throttle.warning("a", "bad %s", 4) is False
        now[0] = 110.0
        assert throttle.warning("a", "bad %s", 5) is True
        assert throttle.warning("a", "bad %s", 6) is False
    assert [r.getMessage() for r in caplog.records] == ["bad 1", "other 3", "bad 5 (2 similar lines suppressed)"]


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_s must be >= 0, got -1"):
        LogThrottle(logging.getLogger("x"), interval_s=-1)
