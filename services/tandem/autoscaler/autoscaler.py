"""The autoscaler loop: read signals, decide, apply, log, export metrics.

Lifecycle of one `step()` (every `interval_s` in the loop thread):
1. Read both pools' signals from Redis (`read_signals`; a Redis error gives missing signals).
2. Ask the actuator for each pool's replicas. If that fails, the error is logged and counted,
   and the step ends without a decision (the policy needs both counts).
3. `decide` (pure) returns one decision per pool and the next policy state. On the first step
   the state is seeded with the current replicas, so a (re)started autoscaler shrinks no pool
   before one stabilisation window has passed.
4. Every decision is logged at INFO, in one line with its reason and the pool's signals.
   `actuator.scale` is called only where desired != current. A failed call is logged and
   counted, and the pool's last change time is left as it was, so the next step retries
   without waiting for a cooldown.
5. Metrics are updated.

Threads: `start()` runs `step` in one daemon thread until `stop()`; an unexpected exception in a
step is logged and the loop goes on. `step()` may also be called directly (tests, a dry run);
a lock keeps two steps from interleaving. The autoscaler owns the policy state; it does not own
the actuator or the Redis client (their creator closes them).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from tandem.autoscaler.actuator import Actuator
from tandem.autoscaler.config import AutoscalerConfig
from tandem.autoscaler.metrics import AutoscalerMetrics
from tandem.autoscaler.policy import PolicyState, ScaleDecision, decide
from tandem.autoscaler.signals import PoolSignals, read_signals
from tandem.common.cluster_state import ClusterState
from tandem.common.workers import WorkerRole

logger = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S = 30.0
WAIT_INTERVAL_S = 0.2  # how often `run` looks for a stop signal


def describe(decision: ScaleDecision, signals: PoolSignals) -> str:
    """The one log line of a decision: what changes, why, and on which signals."""
    return (
        f"pool={decision.role.value} current={decision.current} desired={decision.desired} "
        f"direction={decision.direction.value} reason={decision.reason.value} "
        f"signals={signals.status.value} workers={signals.num_workers} "
        f"queued_prefill_tokens={signals.queued_prefill_tokens} waiting={signals.waiting} "
        f"running={signals.running} kv_usage={signals.kv_usage:.3f}"
    )


class Autoscaler:
    def __init__(
        self,
        state: ClusterState,
        actuator: Actuator,
        config: AutoscalerConfig,
        metrics: AutoscalerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cluster_state = state
        self._actuator = actuator
        self._config = config
        self._metrics = metrics
        self._clock = clock  # wall clock: compared with the workers' load timestamps
        self._policy_state: PolicyState | None = None  # None until the first step seeds it
        self._step_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def policy_state(self) -> PolicyState | None:
        return self._policy_state

    def step(self) -> list[ScaleDecision]:
        """One pass of read, decide, apply (see the module docstring). Returns the decisions,
        `[prefill, decode]`, or `[]` when the actuator could not report the replicas."""
        with self._step_lock:
            now_s = self._clock()
            signals = read_signals(self._cluster_state, now_s, self._config.max_signal_age_s)
            for pool in signals.values():
                self._metrics.observe_signals(pool)
            current = self._read_replicas()
            if current is None:
                return []
            before = PolicyState.seeded(current, now_s) if self._policy_state is None else self._policy_state
            decisions, after = decide(self._config, signals, current, before, now_s)
            for decision in decisions:
                logger.info("%s", describe(decision, signals[decision.role]))
                self._metrics.observe_decision(decision)
                if decision.desired != decision.current and not self._apply(decision):
                    last_change_s = before.pool(decision.role).last_change_s
                    after = after.with_pool(
                        decision.role, dataclasses.replace(after.pool(decision.role), last_change_s=last_change_s)
                    )
            self._policy_state = after
            return decisions

    def _read_replicas(self) -> dict[WorkerRole, int] | None:
        current: dict[WorkerRole, int] = {}
        for role in WorkerRole:
            try:
                current[role] = self._actuator.replicas(role)
            except Exception as exc:
                logger.error(
                    "actuator %s cannot report the %s pool's replicas; no decision this step: %s",
                    self._actuator.name,
                    role.value,
                    exc,
                )
                self._metrics.actuator_error(role)
                return None
        return current

    def _apply(self, decision: ScaleDecision) -> bool:
        try:
            self._actuator.scale(decision.role, decision.desired)
        except Exception as exc:
            logger.error(
                "actuator %s failed to scale the %s pool from %d to %d: %s",
                self._actuator.name,
                decision.role.value,
                decision.current,
                decision.desired,
                exc,
            )
            self._metrics.actuator_error(decision.role)
            return False
        return True

    def start(self) -> None:
        """Run `step` now and then every `interval_s` in a daemon thread. Call once."""
        if self._thread is not None:
            raise RuntimeError("Autoscaler.start() was already called")
        self._thread = threading.Thread(target=self._run, name="tandem-autoscaler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                logger.exception("autoscaler step failed; retrying in %.1f s", self._config.interval_s)
            self._stop.wait(self._config.interval_s)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
        """Stop the loop and join its thread for at most `timeout_s` (a step may be inside an
        actuator call). True if the thread has ended (or never started). Idempotent."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("autoscaler thread still in a step after %.1f s; leaving it (daemon)", timeout_s)
            return False
        return True


def run(autoscaler: Autoscaler, metrics: AutoscalerMetrics, host: str, metrics_port: int) -> int:
    """`tandem autoscaler`: serve metrics, run the loop until SIGTERM or SIGINT, stop it, return 0.

    The signal handler only appends to a list (no locks in a handler); the main thread polls it.
    """
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        port = metrics.serve(host, metrics_port)
        logger.info("autoscaler metrics on http://%s:%d/metrics", host, port)
        autoscaler.start()
        while not received:
            time.sleep(WAIT_INTERVAL_S)
        logger.info("%s received; stopping the autoscaler", signal.Signals(received[0]).name)
        return 0
    finally:
        autoscaler.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
