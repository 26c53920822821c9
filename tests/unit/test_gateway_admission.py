"""Admission at the gateway (admission.py, throughput.py): the decision as a table, the
controller's counts, the measured rates, and the body's `priority` field."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tandem.common.options import add_flags, from_args, to_argv
from tandem.common.request import FinishReason, Request, SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.admission import AdmissionController, PoolLoad
from tandem.gateway.admission_policy import AdmissionConfig, AdmissionSignals, decide
from tandem.gateway.auth import key_id_of
from tandem.gateway.bodies import CompletionRequest
from tandem.gateway.concurrency_limit import KNEE_WINDOWS, ConcurrencyLimit, LimitConfig
from tandem.gateway.errors import OpenAIError
from tandem.gateway.generation import ChoiceSpec, Generation
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.pipeline import Delta
from tandem.gateway.protocol import parse_body
from tandem.gateway.throughput import RateMeter, Throughput


def signals(**overrides: object) -> AdmissionSignals:
    base = dict(
        own_inflight=0,
        own_waiting=0,
        own_waiting_tokens=0,
        key_inflight=0,
        published_waiting=0,
        published_queued_tokens=0,
        start_rate_rps=None,
        token_rate_tps=None,
        finish_rate_rps=None,
    )
    base.update(overrides)
    return AdmissionSignals(**base)  # type: ignore[arg-type]


FIXED = AdmissionConfig(ttft_budget_s=2.0, max_inflight=4, max_inflight_per_key=3, priority_step=0.25)

# (signals, priority, prompt tokens) -> (status, retry_after_s, reason)
CASES = [
    (signals(), 0, 10, (0, 0.0, "")),
    (signals(own_inflight=3), 0, 10, (0, 0.0, "")),
    (signals(own_inflight=4), 0, 10, (503, 1.0, "inflight")),  # no finish rate yet: 1 s
    (signals(own_inflight=4, finish_rate_rps=0.5), 0, 10, (503, 2.0, "inflight")),
    (signals(own_inflight=3), 1, 10, (503, 1.0, "inflight")),  # priority 1: cap floor(4 * 0.75) = 3
    (signals(own_inflight=2), 2, 10, (503, 1.0, "inflight")),  # priority 2: cap 2
    (signals(own_inflight=1), 2, 10, (0, 0.0, "")),
    (signals(own_inflight=0), 9, 10, (0, 0.0, "")),  # any priority when nothing is in flight
    (signals(own_inflight=1), 4, 10, (503, 1.0, "inflight")),  # share 0: cap 1
    (signals(own_inflight=3), -5, 10, (0, 0.0, "")),  # below 0 is like 0
    (signals(own_inflight=3, key_inflight=3, finish_rate_rps=3.0), 0, 10, (429, 1.0, "key")),
    (signals(own_inflight=6, key_inflight=3, finish_rate_rps=0.1), 0, 10, (429, 20.0, "key")),  # its share: 0.05/s
]


@pytest.mark.parametrize(("s", "priority", "tokens", "expected"), CASES)
def test_fixed_bounds(s: AdmissionSignals, priority: int, tokens: int, expected: tuple[int, float, str]) -> None:
    d = decide(s, priority, tokens, FIXED)
    assert (d.status, round(d.retry_after_s, 6), d.reason) == expected


TTFT = AdmissionConfig(ttft_budget_s=2.0, priority_step=0.25, cold_start_queue=8)

TTFT_CASES = [
    # empty queue: admitted whatever the rates say
    (signals(own_inflight=100, start_rate_rps=0.01), 3, 10, (0, 0.0)),
    # cold start: the queue may hold 8 * share requests
    (signals(own_waiting=7), 0, 10, (0, 0.0)),
    (signals(own_waiting=8), 0, 10, (503, 1.0)),
    (signals(own_waiting=5), 2, 10, (503, 1.0)),  # cap floor(8 * 0.5) = 4
    # (queue + 1) / start rate vs the budget: 19 + 1 at 10/s = 2.0 s: admitted; 20 + 1: 2.1 s
    (signals(own_waiting=19, start_rate_rps=10.0), 0, 10, (0, 0.0)),
    (signals(own_waiting=20, start_rate_rps=10.0), 0, 10, (503, 1.0)),
    (signals(own_waiting=30, start_rate_rps=10.0), 0, 10, (503, 1.1)),
    (signals(own_waiting=9, start_rate_rps=10.0), 2, 10, (0, 0.0)),  # budget 1 s: 1.0 s
    (signals(own_waiting=10, start_rate_rps=10.0), 2, 10, (503, 1.0)),
    # published waiting counts other gateways' queue
    (signals(own_waiting=1, published_waiting=40, start_rate_rps=10.0), 0, 10, (503, 2.1)),
    # prompt tokens: (1000 + 100) at 500 tokens/s = 2.2 s
    (signals(own_waiting=1, own_waiting_tokens=1000, start_rate_rps=10.0, token_rate_tps=500.0), 0, 100, (503, 1.0)),
    (signals(own_waiting=1, published_queued_tokens=900, start_rate_rps=10.0, token_rate_tps=500.0), 0, 100, (0, 0.0)),
    (signals(own_waiting=100, start_rate_rps=1.0), 0, 10, (503, 60.0)),  # Retry-After at most 60 s
]


@pytest.mark.parametrize(("s", "priority", "tokens", "expected"), TTFT_CASES)
def test_ttft_bound(s: AdmissionSignals, priority: int, tokens: int, expected: tuple[int, float]) -> None:
    d = decide(s, priority, tokens, TTFT)
    assert (d.status, round(d.retry_after_s, 6)) == expected
    assert d.reason == ("ttft" if d.status else "")


def test_refusal_messages() -> None:
    assert decide(signals(own_inflight=3), 1, 10, FIXED).message == (
        "The server is overloaded: 3 requests in flight, and priority 1 is admitted below 3."
    )
    assert decide(signals(own_waiting=30, start_rate_rps=10.0), 0, 10, TTFT).message == (
        "The server is overloaded: a new request would wait about 3.1 s for its first token, "
        "over the 2.0 s that priority 0 is given."
    )


def test_controller_counts_and_refusals() -> None:
    metrics = GatewayMetrics("m")
    config = AdmissionConfig(max_inflight=2, key_priority=("sk-low=3",))
    controller = AdmissionController(config, metrics, lambda: PoolLoad(0, 0))
    low = key_id_of("sk-low")
    assert controller.priority(low, None) == 3
    assert controller.priority(low, 0) == 0
    assert controller.priority("anonymous", None) == 0
    a = controller.admit("anonymous", 0, 10)
    with pytest.raises(OpenAIError) as refused:
        controller.admit(low, 3, 10)  # share 0.25: cap 1
    assert refused.value.status_code == 503
    assert dict(refused.value.headers) == {"Retry-After": "1"}
    b = controller.admit("anonymous", 0, 5)
    assert (controller.inflight, controller.waiting, controller.waiting_tokens) == (2, 2, 15)
    with pytest.raises(OpenAIError):
        controller.admit("anonymous", 0, 10)
    a.started()
    a.started()
    assert (controller.inflight, controller.waiting, controller.waiting_tokens) == (2, 1, 5)
    a.finished()
    b.finished()
    b.started()  # after the end: no effect
    a.finished()
    assert (controller.inflight, controller.waiting, controller.waiting_tokens) == (0, 0, 0)
    text = metrics.render()[0].decode()
    assert 'tandem_admission_refusals_total{model_name="m",reason="inflight"} 2.0' in text
    assert 'tandem_admitted_requests{model_name="m"} 0.0' in text


def test_per_key_bound_is_429() -> None:
    controller = AdmissionController(AdmissionConfig(max_inflight_per_key=1), GatewayMetrics("m"), PoolLoad)
    controller.admit("key-a", 0, 1)
    controller.admit("key-b", 0, 1)
    with pytest.raises(OpenAIError) as refused:
        controller.admit("key-a", 0, 1)
    assert refused.value.status_code == 429
    assert refused.value.message == "Too many concurrent requests for this API key: the limit is 1."


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("sk", "key_priority entries are KEY=PRIORITY with an integer priority, got 'sk'"),
        ("sk=x", "key_priority entries are KEY=PRIORITY with an integer priority, got 'sk=x'"),
        ("=1", "key_priority entries are KEY=PRIORITY with an integer priority, got '=1'"),
    ],
)
def test_bad_key_priority(entry: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        AdmissionConfig(key_priority=(entry,))
    assert str(error.value) == message


def test_rate_meter_window() -> None:
    now = [100.0]
    meter = RateMeter(10.0, lambda: now[0])
    meter.set_busy(True)
    meter.add()
    meter.add()
    assert meter.rate() is None  # fewer than 3 events
    meter.add()
    assert meter.rate() is None  # less than 0.25 busy seconds
    meter = RateMeter(10.0, lambda: now[0])
    meter.set_busy(True)
    meter.add()
    meter.add()
    now[0] = 101.0
    meter.add()
    assert meter.rate() == pytest.approx(3 / 1.0)
    now[0] = 102.0
    assert meter.rate() == pytest.approx(3 / 2.0)
    meter.set_busy(False)
    now[0] = 105.0  # idle seconds are not counted
    assert meter.busy_seconds() == pytest.approx(2.0)
    assert meter.rate() == pytest.approx(3 / 2.0)
    meter.set_busy(True)
    meter.set_busy(True)  # no-op
    now[0] = 106.0
    meter.add()
    assert meter.busy_seconds() == pytest.approx(3.0)
    assert meter.rate() == pytest.approx(4 / 3.0)
    meter.set_busy(False)
    now[0] = 111.5  # the first three events and 1.5 busy seconds left the window
    assert meter.busy_seconds() == pytest.approx(1.5)
    assert meter.rate() is None
    t = Throughput(10.0, lambda: now[0])
    t.counts(waiting=1, inflight=1)
    for _ in range(4):
        t.started(100)
        now[0] += 0.5
    assert t.starts.rate() == pytest.approx(4 / 2.0)
    assert t.start_tokens.rate() == pytest.approx(400 / 2.0)
    assert t.finishes.rate() is None


def test_burst_after_quiet_spell_is_admitted() -> None:
    """Two quick requests, five quiet seconds, then a burst: the drain rate counts only the
    seconds with a queue, so the burst is admitted up to what the measured rate starts within
    the budget (a rate over wall time, 3 starts in 7.2 s, refused all but 2 of it with 503
    while the pool idled)."""
    now = [100.0]
    config = AdmissionConfig(limit=LimitConfig(adaptive=False))
    controller = AdmissionController(config, GatewayMetrics("m"), lambda: PoolLoad(0, 0), clock=lambda: now[0])
    for _ in range(2):
        ticket = controller.admit("anonymous", 0, 64)
        now[0] += 0.1
        ticket.started()
        now[0] += 1.0
        ticket.finished()
    now[0] += 5.0
    burst = [controller.admit("anonymous", 0, 64) for _ in range(2)]
    now[0] += 0.1
    burst[0].started()  # 3 starts in 0.3 busy seconds: 10 requests/s
    assert controller.throughput.starts.rate() == pytest.approx(3 / 0.3)
    burst += [controller.admit("anonymous", 0, 64) for _ in range(49)]
    assert (controller.inflight, controller.waiting) == (51, 50)
    with pytest.raises(OpenAIError) as refused:  # 50 waiting + this one at 10/s: 5.1 s > 5 s
        controller.admit("anonymous", 0, 64)
    assert refused.value.status_code == 503
    assert "would wait about 5.1 s for its first token, over the 5.0 s" in str(refused.value.message)


@pytest.mark.parametrize(
    ("value", "ok"), [(3, True), (-2, True), (None, True), ("1", False), (1.5, False), (True, False)]
)
def test_body_priority(value: object, ok: bool) -> None:
    raw = json.dumps({"prompt": "x", "priority": value}).encode()
    if ok:
        assert parse_body(raw, CompletionRequest, 4).priority == value
        return
    with pytest.raises(OpenAIError) as error:
        parse_body(raw, CompletionRequest, 4)
    assert error.value.status_code == 400
    assert error.value.param == "priority"
    assert error.value.message == "Invalid type for 'priority': Input should be a valid integer."


# --- the adaptive limit (concurrency_limit.py) ---

STEP = LimitConfig(initial=4, max_limit=6, window=4, quantile=0.75, backoff=0.5)

# (admitted_s, ttft_s, inflight) -> the limit after the sample. Target 1.0 s; the window's
# 0.75 quantile of 4 samples is its 3rd smallest.
TRAJECTORY = [
    ((0.0, 0.1, 4), 4),
    ((0.1, 0.2, 1), 4),
    ((0.2, 0.3, 1), 4),
    ((0.3, 0.4, 1), 5),  # 0.3 <= 1.0, tested (admitted into the last slot: 4 >= 4): + 1
    ((1.0, 0.1, 2), 5),
    ((1.1, 0.1, 2), 5),
    ((1.2, 0.1, 2), 5),
    ((1.3, 0.1, 4), 5),  # within, untested (2, 2, 2, 4 < 5): unchanged
    ((2.0, 0.1, 5), 5),
    ((2.1, 0.1, 1), 5),
    ((2.2, 2.0, 1), 5),
    ((2.3, 1.0, 1), 6),  # [0.1, 0.1, 1.0, 2.0]: 1.0 is not over the target; 5 >= 5: + 1
    ((3.0, 0.1, 6), 6),
    ((3.1, 0.1, 6), 6),
    ((3.2, 0.1, 6), 6),
    ((3.3, 0.1, 6), 6),  # at max_limit
    ((4.0, 0.1, 6), 6),
    ((4.1, 1.5, 6), 6),
    ((4.2, 2.0, 6), 6),
    ((4.3, 0.2, 6), 3),  # [0.1, 0.2, 1.5, 2.0]: 1.5 > 1.0: floor(6 * 0.5); stale before 4.5
    ((4.4, 9.0, 6), 3),  # admitted before the decrease: ignored
    ((4.5, 1.1, 3), 3),
    ((4.6, 1.2, 3), 3),
    ((4.7, 1.3, 3), 3),
    ((4.8, 1.4, 3), 1),  # floor(3 * 0.5); stale before 6.2
    ((6.2, 5.0, 1), 1),
    ((6.3, 5.0, 1), 1),
    ((6.4, 5.0, 1), 1),
    ((6.5, 5.0, 1), 1),  # never below 1
    ((20.0, 0.0, 1), 1),
    ((20.0, 0.0, 1), 1),
    ((20.0, 0.0, 1), 1),
    ((20.0, 0.0, 1), 2),  # 1 >= 1: tested
]


def test_limit_trajectory() -> None:
    limit = ConcurrencyLimit(STEP, 1.0)
    assert limit.limit == 4
    got = [limit.observe(*sample) for sample, _ in TRAJECTORY]
    assert got == [expected for _, expected in TRAJECTORY]
    assert limit.limit == 2


QUEUE_STEP = LimitConfig(initial=10, max_limit=20, window=2, quantile=1.0, backoff=0.8)

# (admitted_s, ttft_s, inflight, queue_s) -> the limit after the sample. Target 1.0 s; a sample
# queued when its queue wait is over 2/3 of its TTFT.
QUEUE_TRAJECTORY = [
    ((0.0, 0.3, 10, 0.1), 10),
    ((0.1, 0.3, 9, None), 11),  # within, tested (10 >= 10): + 1
    ((0.2, 3.0, 11, 2.0), 11),  # 2.0 is 2/3 of 3.0, not over it: not queued
    ((0.3, 0.9, 11, 0.61), 8),  # 0.61 > 0.6: queued, at once: floor(11 * 0.8); stale before 1.2
    ((0.5, 2.0, 11, 1.9), 8),  # admitted before the decrease: ignored
    ((1.2, 0.2, 8, 0.0), 8),  # the window started over: [0.2]
    ((1.3, 0.2, 8, None), 9),  # within, tested: + 1
    ((1.4, 0.5, 8, 0.2), 9),
    ((1.5, 0.6, 8, 0.3), 9),  # within, untested (8, 8 < 9): unchanged
    ((1.6, 0.1, 1, 0.1), 7),  # all of it queue wait: floor(9 * 0.8); stale before 1.7
    ((1.65, 5.0, 7, 5.0), 7),  # stale
]


def test_limit_backs_off_at_once_on_a_queued_sample() -> None:
    limit = ConcurrencyLimit(QUEUE_STEP, 1.0)
    got = [limit.observe(*sample) for sample, _ in QUEUE_TRAJECTORY]
    assert got == [expected for _, expected in QUEUE_TRAJECTORY]


def test_limit_lingers_below_the_knee() -> None:
    limit = ConcurrencyLimit(LimitConfig(initial=10, window=1, backoff=0.5), 1.0)
    assert limit.observe(0.0, 0.1, 10) == 11
    assert limit.observe(1.0, 0.9, 11, 0.7) == 5  # queued at 11: the knee; floor(11 * 0.5)
    got = [limit.observe(2.0 + i, 0.1, limit.limit) for i in range(5)]
    assert got == [6, 7, 8, 9, 10]  # one window each, up to one below the knee
    got = [limit.observe(10.0 + i, 0.1, 10) for i in range(KNEE_WINDOWS)]
    assert got == [10] * (KNEE_WINDOWS - 1) + [11]  # from there, KNEE_WINDOWS windows each
    got = [limit.observe(20.0 + i, 0.1, 11) for i in range(KNEE_WINDOWS)]
    assert got == [11] * (KNEE_WINDOWS - 1) + [12]  # past the knee cleanly: forgotten
    assert [limit.observe(30.0 + i, 0.1, limit.limit) for i in range(2)] == [13, 14]
    limit.observe(40.0, 0.9, 14, 0.7)  # a knee at 14 again: 7
    got = [limit.observe(50.0 + i, 0.1, limit.limit) for i in range(6)]
    assert got == [8, 9, 10, 11, 12, 13]
    assert limit.observe(60.0, 2.0, 13) == 6  # over the target: the knee stays, the count restarts
    got = [limit.observe(70.0 + i, 0.1, limit.limit) for i in range(7)]
    assert got == [7, 8, 9, 10, 11, 12, 13]
    assert [limit.observe(80.0 + i, 0.1, 13) for i in range(KNEE_WINDOWS)][-1] == 14


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttft_target_s": 0.0}, "ttft_target_s must be > 0, got 0.0"),
        ({"initial": 0}, "initial must be >= 1, got 0"),
        ({"initial": 8, "max_limit": 7}, "max_limit must be >= initial (8), got 7"),
        ({"window": 0}, "window must be >= 1, got 0"),
        ({"quantile": 0.0}, "quantile must be in (0, 1], got 0.0"),
        ({"backoff": 1.0}, "backoff must be in (0, 1), got 1.0"),
    ],
)
def test_bad_limit_config(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError) as error:
        LimitConfig(**kwargs)  # type: ignore[arg-type]
    assert str(error.value) == message


def test_limit_target_and_bad_samples() -> None:
    assert AdmissionConfig(ttft_budget_s=3.0).ttft_target_s() == 1.5
    assert AdmissionConfig(ttft_budget_s=3.0, limit=LimitConfig(ttft_target_s=0.25)).ttft_target_s() == 0.25
    with pytest.raises(ValueError) as error:
        AdmissionConfig(ttft_budget_s=1.0, limit=LimitConfig(ttft_target_s=2.0))
    assert str(error.value) == (
        "ttft_target_s (2.0) must be <= ttft_budget_s (1.0): the adaptive limit's target is within the budget "
        "admission promises"
    )
    limit = ConcurrencyLimit(LimitConfig(), 0.5)
    with pytest.raises(ValueError):
        limit.observe(0.0, -0.1, 1)
    with pytest.raises(ValueError):
        limit.observe(0.0, 0.1, 0)
    with pytest.raises(ValueError) as error:
        limit.observe(0.0, 0.1, 1, -0.01)
    assert str(error.value) == ("a sample needs ttft_s >= 0, inflight >= 1 and queue_s >= 0 or None, got 0.1, 1, -0.01")
    with pytest.raises(ValueError):
        limit.observe(0.0, 0.1, 1, math.nan)


LIMITED = AdmissionConfig(ttft_budget_s=2.0, priority_step=0.25)

# (signals, priority) -> (status, retry_after_s, reason): the adaptive limit is 8; target 1 s.
LIMIT_CASES = [
    (signals(own_inflight=7, limit=8), 0, (0, 0.0, "")),
    (signals(own_inflight=8, limit=8), 0, (503, 1.0, "limit")),  # no finish rate yet
    (signals(own_inflight=10, limit=8, finish_rate_rps=2.0), 0, (503, 1.5, "limit")),  # 3 over at 2/s
    (signals(own_inflight=6, limit=8), 1, (503, 1.0, "limit")),  # share 0.75: cap 6
    (signals(own_inflight=5, limit=8), 1, (0, 0.0, "")),
    (signals(own_inflight=0, limit=1), 4, (0, 0.0, "")),  # share 0: cap 1
    (signals(own_inflight=100, limit=None), 0, (0, 0.0, "")),  # off
]


@pytest.mark.parametrize(("s", "priority", "expected"), LIMIT_CASES)
def test_limit_bound(s: AdmissionSignals, priority: int, expected: tuple[int, float, str]) -> None:
    d = decide(s, priority, 10, LIMITED)
    assert (d.status, round(d.retry_after_s, 6), d.reason) == expected


def test_controller_feeds_the_limit() -> None:
    now = [0.0]
    metrics = GatewayMetrics("m")
    config = AdmissionConfig(ttft_budget_s=2.0, limit=LimitConfig(initial=2, window=1, quantile=1.0, backoff=0.5))
    controller = AdmissionController(config, metrics, PoolLoad, clock=lambda: now[0])

    def limit_gauge() -> str:
        lines = metrics.render()[0].decode().splitlines()
        return next(line for line in lines if line.startswith("tandem_admission_limit{"))

    assert limit_gauge() == 'tandem_admission_limit{model_name="m"} 2.0'
    a = controller.admit("k", 0, 10)
    b = controller.admit("k", 0, 10)
    with pytest.raises(OpenAIError) as refused:
        controller.admit("k", 0, 10)
    assert refused.value.status_code == 503
    assert dict(refused.value.headers) == {"Retry-After": "1"}
    assert refused.value.message == (
        "The server is overloaded: 2 requests in flight, and priority 0 is admitted below 2 "
        "(the limit measured to keep the first token within 1.00 s)."
    )
    now[0] = 0.5
    b.started()  # TTFT 0.5 s <= 1 s, and admitted into the last slot (2 >= 2): + 1
    assert controller.limit is not None and controller.limit.limit == 3
    assert limit_gauge() == 'tandem_admission_limit{model_name="m"} 3.0'
    c = controller.admit("k", 0, 10)
    now[0] = 1.6
    # a has waited 1.6 s: a late sample at once (limit 3 -> 1); c (admitted at 0.5, waited 1.1 s)
    # was admitted before that decrease: stale. Then 3 in flight >= 1: refused.
    with pytest.raises(OpenAIError):
        controller.admit("k", 0, 10)
    assert controller.limit.limit == 1
    assert limit_gauge() == 'tandem_admission_limit{model_name="m"} 1.0'
    a.started()  # already sampled
    c.finished()  # ended before its first token: no sample
    a.finished()
    b.finished()
    assert (controller.inflight, controller.waiting, controller.waiting_tokens) == (0, 0, 0)
    now[0] = 2.0
    d = controller.admit("k", 3, 10)  # nothing in flight: any priority
    now[0] = 2.2
    d.started()  # admitted after the decrease: fresh, within, tested: + 1
    assert controller.limit.limit == 2
    d.finished()
    text = metrics.render()[0].decode()
    assert 'tandem_admission_refusals_total{model_name="m",reason="limit"} 2.0' in text


def test_controller_feeds_the_queue_wait() -> None:
    now = [0.0]
    config = AdmissionConfig(ttft_budget_s=2.0, limit=LimitConfig(initial=4, window=2, quantile=1.0, backoff=0.5))
    controller = AdmissionController(config, GatewayMetrics("m"), PoolLoad, clock=lambda: now[0])
    assert controller.limit is not None
    a = controller.admit("k", 0, 10)
    now[0] = 0.3
    a.started(0.25)  # 0.25 of a 0.3 s TTFT waiting in a worker's queue: queued, floor(4 * 0.5)
    assert controller.limit.limit == 2
    b = controller.admit("k", 0, 10)  # 2 in flight
    now[0] = 0.6
    b.started(math.nan)  # a nonsensical figure is not known: a plain sample of 0.3 s
    a.finished()
    d = controller.admit("k", 0, 10)
    now[0] = 0.7
    d.started(-1.0)  # likewise; [0.3, 0.1] within the target, b was tested (2 >= 2): + 1
    assert controller.limit.limit == 3
    b.finished()
    d.finished()
    e = controller.admit("k", 0, 10)
    now[0] = 1.8
    # e has waited 1.1 s > the 1 s target: a late sample, all of it queue wait: at once, though
    # the window (2) is not full: floor(3 * 0.5); then 1 in flight >= 1: refused
    with pytest.raises(OpenAIError):
        controller.admit("k", 0, 10)
    assert controller.limit.limit == 1
    e.started(0.0)  # already sampled
    e.finished()
    assert (controller.inflight, controller.waiting, controller.waiting_tokens) == (0, 0, 0)


def test_adaptive_limit_off() -> None:
    metrics = GatewayMetrics("m")
    controller = AdmissionController(AdmissionConfig(limit=LimitConfig(adaptive=False)), metrics, PoolLoad)
    assert controller.limit is None
    assert controller.signals("k").limit is None
    assert 'tandem_admission_limit{model_name="m"} 0.0' in metrics.render()[0].decode()
    tickets = []
    for _ in range(100):  # no count bound: 100 in flight, each started (nothing queued)
        tickets.append(controller.admit("k", 0, 1))
        tickets[-1].started()
    assert controller.inflight == 100
    for t in tickets:
        t.finished()
    assert controller.inflight == 0


def test_limit_flags_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, AdmissionConfig)
    argv = ["--no-adaptive-limit", "--ttft-target-s", "0.5", "--limit-initial", "8", "--limit-backoff", "0.7"]
    config = from_args(AdmissionConfig, parser.parse_args(argv))
    assert config == AdmissionConfig(
        limit=LimitConfig(adaptive=False, ttft_target_s=0.5, initial=8, backoff=0.7),
    )
    assert to_argv(config) == argv
    assert from_args(AdmissionConfig, parser.parse_args([])) == AdmissionConfig()


class _QueuedPipeline:
    """Two deltas; the first says the request waited 0.125 s in a worker's queue."""

    async def generate(self, request: Request, parent: object = None, session: object = None) -> AsyncIterator[Delta]:
        yield Delta((7,), (), None, queue_s=0.125)
        yield Delta((8,), (), FinishReason.LENGTH, queue_s=0.5)  # only the first delta's counts


def test_generation_keeps_the_first_deltas_queue_wait(tiny_model_dir: Path) -> None:
    params = SamplingParams(max_tokens=2, temperature=0.0)
    generation = Generation(
        _QueuedPipeline(),  # type: ignore[arg-type]
        Tokenizer.from_pretrained(tiny_model_dir),
        GatewayMetrics("m"),
        "cmpl-q",
        [ChoiceSpec(0, (5, 6), params)],
        (),
        None,
        None,
    )
    assert generation.first_queue_s is None

    async def drain() -> list[tuple[int, ...]]:
        return [event.token_ids async for event in generation.events()]

    assert asyncio.run(drain()) == [(7,), (8,)]
    assert generation.first_queue_s == 0.125
