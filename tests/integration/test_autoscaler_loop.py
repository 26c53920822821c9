"""`Autoscaler.step` and its loop over a real redis-server, with an in-memory actuator: the
decisions applied, the exact log lines and metric values, and actuator failures that do not
stop the loop."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import redis

from tandem.autoscaler.autoscaler import Autoscaler
from tandem.autoscaler.config import AutoscalerConfig, DecodePolicy, PrefillPolicy
from tandem.autoscaler.metrics import AutoscalerMetrics
from tandem.autoscaler.policy import ScaleDecision, ScaleReason
from tandem.common.cluster_state import ClusterState
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole

P, D = WorkerRole.PREFILL, WorkerRole.DECODE
R = ScaleReason
START_S = 1_700_000_000.0
CONFIG = AutoscalerConfig(
    prefill=PrefillPolicy(min_replicas=0, max_replicas=8, target_queued_tokens_per_replica=1000),
    decode=DecodePolicy(min_replicas=1, max_replicas=8, target_waiting_per_replica=4.0, target_kv_usage=0.8),
    interval_s=0.05,
    stabilisation_window_s=60.0,
    up_cooldown_s=30.0,
    down_cooldown_s=0.0,
    max_signal_age_s=15.0,
)


class FakeActuator:
    """Replica counts in a dict; `scale` sets them. Failures on demand."""

    name = "fake"

    def __init__(self, prefill: int, decode: int) -> None:
        self.counts = {P: prefill, D: decode}
        self.scale_calls: list[tuple[WorkerRole, int]] = []
        self.fail_scale: set[WorkerRole] = set()
        self.replicas_failures = 0  # the next N `replicas` calls raise
        self._lock = threading.Lock()

    def replicas(self, role: WorkerRole) -> int:
        with self._lock:
            if self.replicas_failures:
                self.replicas_failures -= 1
                raise RuntimeError("API unavailable")
            return self.counts[role]

    def scale(self, role: WorkerRole, replicas: int) -> None:
        with self._lock:
            self.scale_calls.append((role, replicas))
            if role in self.fail_scale:
                raise RuntimeError("quota exceeded")
            self.counts[role] = replicas

    def close(self) -> None:
        pass


class FakeClock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def publish(
    state: ClusterState, worker_id: str, now_s: float, queued: int = 0, waiting: int = 0, used: int = 0
) -> None:
    role = P if worker_id.startswith("p") else D
    state.register(WorkerInfo(worker_id, role, f"{worker_id}:7000", "ab12", 100, "t"), ttl_s=60.0)
    state.publish_load(worker_id, WorkerLoad(waiting, 1, queued, used, 100, now_s), ttl_s=60.0)


def sample(metrics: AutoscalerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def state(redis_client: redis.Redis) -> ClusterState:
    return ClusterState(redis_client, "loop")


def test_step_applies_decisions_logs_and_exports_metrics(state, caplog):
    clock, actuator, metrics = FakeClock(START_S), FakeActuator(prefill=1, decode=1), AutoscalerMetrics()
    publish(state, "p-0", START_S, queued=5000)
    publish(state, "d-0", START_S, waiting=4, used=10)
    autoscaler = Autoscaler(state, actuator, CONFIG, metrics, clock=clock)

    with caplog.at_level(logging.INFO, logger="tandem.autoscaler.autoscaler"):
        decisions = autoscaler.step()

    assert decisions == [ScaleDecision(P, 1, 5, R.QUEUE_ABOVE_TARGET), ScaleDecision(D, 1, 1, R.WITHIN_TOLERANCE)]
    assert actuator.scale_calls == [(P, 5)]
    assert [r.getMessage() for r in caplog.records] == [
        "pool=prefill current=1 desired=5 direction=up reason=queue_above_target signals=fresh workers=1 "
        "queued_prefill_tokens=5000 waiting=0 running=1 kv_usage=0.000",
        "pool=decode current=1 desired=1 direction=hold reason=within_tolerance signals=fresh workers=1 "
        "queued_prefill_tokens=0 waiting=4 running=1 kv_usage=0.100",
    ]
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    expected = {
        ("tandem_autoscaler_decisions_total", "prefill", "queue_above_target", "up"): 1.0,
        ("tandem_autoscaler_decisions_total", "decode", "within_tolerance", "hold"): 1.0,
    }
    for (name, pool, reason, direction), value in expected.items():
        assert sample(metrics, name, pool=pool, reason=reason, direction=direction) == value
    assert {
        (name, pool): sample(metrics, name, pool=pool)
        for name in (
            "tandem_autoscaler_desired_replicas",
            "tandem_autoscaler_current_replicas",
            "tandem_autoscaler_workers",
            "tandem_autoscaler_queued_prefill_tokens",
            "tandem_autoscaler_waiting_requests",
            "tandem_autoscaler_running_requests",
            "tandem_autoscaler_kv_usage",
            "tandem_autoscaler_signals_fresh",
        )
        for pool in ("prefill", "decode")
    } == {
        ("tandem_autoscaler_desired_replicas", "prefill"): 5.0,
        ("tandem_autoscaler_desired_replicas", "decode"): 1.0,
        ("tandem_autoscaler_current_replicas", "prefill"): 1.0,
        ("tandem_autoscaler_current_replicas", "decode"): 1.0,
        ("tandem_autoscaler_workers", "prefill"): 1.0,
        ("tandem_autoscaler_workers", "decode"): 1.0,
        ("tandem_autoscaler_queued_prefill_tokens", "prefill"): 5000.0,
        ("tandem_autoscaler_queued_prefill_tokens", "decode"): 0.0,
        ("tandem_autoscaler_waiting_requests", "prefill"): 0.0,
        ("tandem_autoscaler_waiting_requests", "decode"): 4.0,
        ("tandem_autoscaler_running_requests", "prefill"): 1.0,
        ("tandem_autoscaler_running_requests", "decode"): 1.0,
        ("tandem_autoscaler_kv_usage", "prefill"): 0.0,
        ("tandem_autoscaler_kv_usage", "decode"): 0.1,
        ("tandem_autoscaler_signals_fresh", "prefill"): 1.0,
        ("tandem_autoscaler_signals_fresh", "decode"): 1.0,
    }

    clock.now_s += 10.0  # within the up cooldown: the queue grew, the pool waits
    publish(state, "p-0", clock.now_s, queued=9000)
    publish(state, "d-0", clock.now_s, waiting=4, used=10)
    assert autoscaler.step()[0] == ScaleDecision(P, 5, 5, R.COOLDOWN)
    assert actuator.scale_calls == [(P, 5)]
    assert (
        sample(metrics, "tandem_autoscaler_decisions_total", pool="prefill", reason="cooldown", direction="hold") == 1.0
    )


def test_a_failed_scale_is_logged_counted_and_retried_without_cooldown(state, caplog):
    clock, actuator, metrics = FakeClock(START_S), FakeActuator(prefill=1, decode=1), AutoscalerMetrics()
    publish(state, "p-0", START_S, queued=3000)
    publish(state, "d-0", START_S, waiting=4)
    actuator.fail_scale = {P}
    autoscaler = Autoscaler(state, actuator, CONFIG, metrics, clock=clock)

    assert autoscaler.step()[0] == ScaleDecision(P, 1, 3, R.QUEUE_ABOVE_TARGET)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "actuator fake failed to scale the prefill pool from 1 to 3: quota exceeded"
    ]
    assert sample(metrics, "tandem_autoscaler_actuator_errors_total", pool="prefill") == 1.0
    assert autoscaler.policy_state is not None and autoscaler.policy_state.prefill.last_change_s is None

    actuator.fail_scale = set()
    clock.now_s += 1.0  # well within the up cooldown, which a failed change does not start
    publish(state, "p-0", clock.now_s, queued=3000)
    publish(state, "d-0", clock.now_s, waiting=4)
    assert autoscaler.step()[0] == ScaleDecision(P, 1, 3, R.QUEUE_ABOVE_TARGET)
    assert actuator.scale_calls == [(P, 3), (P, 3)]
    assert actuator.counts == {P: 3, D: 1}
    assert autoscaler.policy_state.prefill.last_change_s == clock.now_s


def test_replicas_failure_skips_the_step(state, caplog):
    clock, actuator, metrics = FakeClock(START_S), FakeActuator(prefill=1, decode=1), AutoscalerMetrics()
    publish(state, "p-0", START_S, queued=3000)
    publish(state, "d-0", START_S, waiting=4)
    actuator.replicas_failures = 1
    autoscaler = Autoscaler(state, actuator, CONFIG, metrics, clock=clock)

    assert autoscaler.step() == []
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "actuator fake cannot report the prefill pool's replicas; no decision this step: API unavailable"
    ]
    assert sample(metrics, "tandem_autoscaler_actuator_errors_total", pool="prefill") == 1.0
    assert actuator.scale_calls == [] and autoscaler.policy_state is None
    assert [d.desired for d in autoscaler.step()] == [3, 1]


def test_a_restarted_autoscaler_waits_one_window_before_shrinking(state):
    clock, actuator, metrics = FakeClock(START_S), FakeActuator(prefill=4, decode=1), AutoscalerMetrics()
    autoscaler = Autoscaler(state, actuator, CONFIG, metrics, clock=clock)
    for offset_s, expected in [
        (0.0, ScaleDecision(P, 4, 4, R.STABILISING)),
        (59.0, ScaleDecision(P, 4, 4, R.STABILISING)),
        (60.0, ScaleDecision(P, 4, 0, R.SCALE_DOWN)),
    ]:
        clock.now_s = START_S + offset_s
        publish(state, "p-0", clock.now_s, queued=0)
        publish(state, "d-0", clock.now_s, waiting=4)
        assert autoscaler.step()[0] == expected
    assert actuator.scale_calls == [(P, 0)]


def test_unreachable_redis_holds_both_pools_and_blanks_the_load_gauges(unreachable_redis_client):
    actuator, metrics = FakeActuator(prefill=2, decode=3), AutoscalerMetrics()
    decisions = Autoscaler(ClusterState(unreachable_redis_client, "loop"), actuator, CONFIG, metrics).step()
    assert decisions == [ScaleDecision(P, 2, 2, R.MISSING_SIGNALS), ScaleDecision(D, 3, 3, R.MISSING_SIGNALS)]
    assert actuator.scale_calls == []
    assert math.isnan(sample(metrics, "tandem_autoscaler_waiting_requests", pool="decode"))
    assert sample(metrics, "tandem_autoscaler_signals_fresh", pool="decode") == 0.0


def test_loop_thread_survives_actuator_errors_and_stops_within_bound(state):
    actuator, metrics = FakeActuator(prefill=1, decode=1), AutoscalerMetrics()
    actuator.replicas_failures = 3  # the first three steps fail
    publish(state, "p-0", time.time(), queued=2000)
    publish(state, "d-0", time.time(), waiting=4)
    autoscaler = Autoscaler(state, actuator, CONFIG, metrics)  # the real clock
    autoscaler.start()
    try:
        deadline = time.monotonic() + 10.0
        while not actuator.scale_calls and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        assert autoscaler.stop(timeout_s=5.0) is True
    assert actuator.scale_calls == [(P, 2)]
    assert sample(metrics, "tandem_autoscaler_actuator_errors_total", pool="prefill") == 3.0
    with pytest.raises(RuntimeError, match="already called"):
        autoscaler.start()
