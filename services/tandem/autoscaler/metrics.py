"""Prometheus metrics of the autoscaler (DESIGN.md section 4, "Metrics": the `tandem_` prefix).

One `AutoscalerMetrics` per autoscaler, with its own registry (no module-level globals); the
autoscaler loop is its only writer. Every series has a `pool` label (`prefill` | `decode`):

- `tandem_autoscaler_decisions_total{pool,reason,direction}`: decisions by reason and by
  direction (`up` | `down` | `hold`), one per pool per step.
- `tandem_autoscaler_desired_replicas{pool}`, `tandem_autoscaler_current_replicas{pool}`.
- `tandem_autoscaler_workers{pool}`: live workers in Redis.
- `tandem_autoscaler_queued_prefill_tokens{pool}`, `tandem_autoscaler_waiting_requests{pool}`,
  `tandem_autoscaler_running_requests{pool}`, `tandem_autoscaler_kv_usage{pool}` (0 to 1): the
  pool's load as the policy saw it; NaN when Redis could not be read.
- `tandem_autoscaler_signals_fresh{pool}`: 1 when the pool's signals were fresh, else 0.
- `tandem_autoscaler_actuator_errors_total{pool}`: failed `replicas` / `scale` calls.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tandem.autoscaler.policy import ScaleDecision
from tandem.autoscaler.signals import PoolSignals, SignalStatus
from tandem.common.workers import WorkerRole


class AutoscalerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        pool = ["pool"]
        self._decisions = Counter(
            "tandem_autoscaler_decisions", "Autoscaler decisions by reason", ["pool", "reason", "direction"], registry=r
        )
        self._desired = Gauge(
            "tandem_autoscaler_desired_replicas", "Replicas the autoscaler asked for", pool, registry=r
        )
        self._current = Gauge("tandem_autoscaler_current_replicas", "Replicas the actuator reported", pool, registry=r)
        self._workers = Gauge("tandem_autoscaler_workers", "Live workers in the cluster state", pool, registry=r)
        self._queued = Gauge(
            "tandem_autoscaler_queued_prefill_tokens", "Queued prefill tokens of the pool", pool, registry=r
        )
        self._waiting = Gauge("tandem_autoscaler_waiting_requests", "Waiting requests of the pool", pool, registry=r)
        self._running = Gauge("tandem_autoscaler_running_requests", "Running requests of the pool", pool, registry=r)
        self._kv_usage = Gauge(
            "tandem_autoscaler_kv_usage", "KV blocks used / total of the pool, 0 to 1", pool, registry=r
        )
        self._fresh = Gauge("tandem_autoscaler_signals_fresh", "1 if the pool's signals were fresh", pool, registry=r)
        self._actuator_errors = Counter("tandem_autoscaler_actuator_errors", "Failed actuator calls", pool, registry=r)

    def observe_signals(self, signals: PoolSignals) -> None:
        """Set the pool's load gauges (NaN where Redis could not be read)."""
        pool = signals.role.value
        known = signals.status is not SignalStatus.MISSING
        values = {
            self._workers: signals.num_workers,
            self._queued: signals.queued_prefill_tokens,
            self._waiting: signals.waiting,
            self._running: signals.running,
            self._kv_usage: signals.kv_usage,
        }
        for gauge, value in values.items():
            gauge.labels(pool=pool).set(value if known else math.nan)
        self._fresh.labels(pool=pool).set(1.0 if signals.fresh else 0.0)

    def observe_decision(self, decision: ScaleDecision) -> None:
        pool = decision.role.value
        self._decisions.labels(pool=pool, reason=decision.reason.value, direction=decision.direction.value).inc()
        self._desired.labels(pool=pool).set(decision.desired)
        self._current.labels(pool=pool).set(decision.current)

    def actuator_error(self, role: WorkerRole) -> None:
        self._actuator_errors.labels(pool=role.value).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on (host, port) from a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
