"""The autoscaling policy: a pure function from (signals, current replicas, history) to decisions.

`decide(config, signals, current, state, now_s)` returns one `ScaleDecision` per pool (prefill
first) and the next `PolicyState`. It reads no clock and touches nothing: the autoscaler loop
(`services/tandem/autoscaler/autoscaler.py`) owns the state between steps and applies the decisions.

Rules, per pool, in this order:
1. Recommendation, with the Kubernetes HPA's tolerance band (no change while the load-to-target
   ratio is within 1 ± tolerance):
   - prefill: ceil(queued prefill tokens / target_queued_tokens_per_replica);
   - decode: the larger of ceil(waiting / target_waiting_per_replica) and
     ceil(workers x kv_usage / target_kv_usage) (the queue wins a tie), where workers is
     min(current, live workers in Redis). Like the HPA, which counts only ready pods, replicas
     that are still starting hold no KV yet and are not counted as full; workers deregister
     when they start draining, and the min keeps any that linger from counting twice.
     The tolerance band applies to kv_usage / target_kv_usage.
2. Clamp to [min_replicas, max_replicas]. The clamped recommendation is recorded in the pool's
   history (kept for `stabilisation_window_s`).
3. Up: applied at once, unless the pool changed less than `up_cooldown_s` ago.
   Down: only to the highest recommendation of the window (HPA scale-down stabilisation), and
   not within `down_cooldown_s` of the pool's last change.
4. Missing or stale signals: the pool never moves on them, neither down nor up, and nothing is
   recorded. Only the bounds act: a pool below min is raised to min, one above max is lowered
   to max (the bounds are the operator's, not a reading of the load).
Bounds win over cooldowns: a pool outside [min, max] is brought back even during a cooldown.

Then, across pools, only when both pools' signals are fresh: desired prefill / desired decode is
kept within [min_prefill_per_decode, max_prefill_per_decode] by raising the smaller pool first
(within its max), then lowering the larger (within its min). A pool moved this way has reason
`ratio_bound`; the ratio bounds override cooldowns and stabilisation.

Planned ratio (`planned_prefill_per_decode` = r, set from `tandem plan`), only when both pools'
signals are fresh, before the ratio bounds: the pools grow together so that the busier one,
counted in the other's units, sets both sizes:
    decode  = clamp(max(decode desired, ceil(prefill desired / r)))
    prefill = clamp(max(prefill desired, ceil(r x decode)))
Neither pool ends below its own decision (so the plan never skips a cooldown or a stabilisation
window downwards); as the load falls, both pools' own decisions fall and the pair shrinks along
the plan. A pool moved this way has reason `planned_ratio`, and the plan overrides up-cooldowns
as the ratio bounds do.

A pool's last change time is `now_s` whenever its decision has desired != current.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from tandem.autoscaler.config import AutoscalerConfig, PoolPolicy
from tandem.autoscaler.signals import PoolSignals, SignalStatus
from tandem.common.workers import WorkerRole

_EPS = 1e-9  # float slack: 10 x 0.3 rounds up to 3, not 4; 2200 / 2000 is within 10 %


class ScaleReason(str, enum.Enum):
    QUEUE_ABOVE_TARGET = "queue_above_target"  # up: queued prefill tokens / waiting requests
    KV_ABOVE_TARGET = "kv_above_target"  # up: decode KV use above target_kv_usage
    SCALE_DOWN = "scale_down"  # down: load below target and the window agrees
    WITHIN_TOLERANCE = "within_tolerance"  # hold: load / target within 1 ± tolerance
    AT_TARGET = "at_target"  # hold: rounding the recommendation up gives the current count
    STABILISING = "stabilising"  # hold: load is low, but a higher recommendation is in the window
    COOLDOWN = "cooldown"  # hold: the pool changed less than a cooldown ago
    BELOW_MIN = "below_min"  # the recommendation (or the pool) is below min_replicas
    ABOVE_MAX = "above_max"  # the recommendation (or the pool) is above max_replicas
    MISSING_SIGNALS = "missing_signals"  # hold: Redis could not be read
    STALE_SIGNALS = "stale_signals"  # hold: a live worker's load is absent or too old
    RATIO_BOUND = "ratio_bound"  # moved to keep prefill / decode within the ratio bounds
    PLANNED_RATIO = "planned_ratio"  # moved to follow planned_prefill_per_decode


class ScaleDirection(str, enum.Enum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


_UNUSABLE = {SignalStatus.MISSING: ScaleReason.MISSING_SIGNALS, SignalStatus.STALE: ScaleReason.STALE_SIGNALS}


@dataclass(frozen=True)
class ScaleDecision:
    """Bring `role`'s pool from `current` to `desired` replicas, because of `reason`."""

    role: WorkerRole
    current: int
    desired: int
    reason: ScaleReason

    def __post_init__(self) -> None:
        for name in ("current", "desired"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    @property
    def direction(self) -> ScaleDirection:
        if self.desired > self.current:
            return ScaleDirection.UP
        return ScaleDirection.DOWN if self.desired < self.current else ScaleDirection.HOLD


@dataclass(frozen=True)
class Recommendation:
    at_s: float
    replicas: int


@dataclass(frozen=True)
class PoolHistory:
    """What the policy remembers of one pool: its recent recommendations (oldest first) and the
    time of its last change (None: never changed by this autoscaler)."""

    recommendations: tuple[Recommendation, ...] = ()
    last_change_s: float | None = None

    def record(self, now_s: float, replicas: int, window_s: float) -> PoolHistory:
        """This history plus `replicas` at `now_s`, without entries `window_s` old or older."""
        kept = tuple(r for r in self.recommendations if now_s - r.at_s < window_s)
        return dataclasses.replace(self, recommendations=(*kept, Recommendation(now_s, replicas)))

    def highest(self) -> int:
        return max(r.replicas for r in self.recommendations)

    def changed_within(self, now_s: float, span_s: float) -> bool:
        return self.last_change_s is not None and now_s - self.last_change_s < span_s


@dataclass(frozen=True)
class PolicyState:
    """The policy's memory between steps, one `PoolHistory` per pool. Returned by `decide`."""

    prefill: PoolHistory = field(default_factory=PoolHistory)
    decode: PoolHistory = field(default_factory=PoolHistory)

    @classmethod
    def seeded(cls, current: Mapping[WorkerRole, int], now_s: float) -> PolicyState:
        """A start state that counts the current replicas as a recommendation made at `now_s`:
        a (re)started autoscaler then shrinks no pool before one stabilisation window."""
        return cls(**{role.value: PoolHistory((Recommendation(now_s, current[role]),)) for role in WorkerRole})

    def pool(self, role: WorkerRole) -> PoolHistory:
        return self.prefill if role is WorkerRole.PREFILL else self.decode

    def with_pool(self, role: WorkerRole, history: PoolHistory) -> PolicyState:
        return dataclasses.replace(self, **{role.value: history})


@dataclass(frozen=True)
class _Proposal:
    replicas: int
    reason: ScaleReason


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _floor(x: float) -> int:
    return math.floor(x + _EPS)


def _metric_proposal(usage_ratio: float, demand: float, current: int, tolerance: float, up: ScaleReason) -> _Proposal:
    """What one metric asks for. `usage_ratio` is the metric over its target (1: on target);
    `demand` the exact replica count at which it would sit on its target."""
    if current > 0 and abs(usage_ratio - 1.0) <= tolerance + _EPS:
        return _Proposal(current, ScaleReason.WITHIN_TOLERANCE)
    replicas = _ceil(demand)
    if replicas > current:
        return _Proposal(replicas, up)
    return _Proposal(replicas, ScaleReason.SCALE_DOWN if replicas < current else ScaleReason.AT_TARGET)


def _recommend_prefill(config: AutoscalerConfig, signals: PoolSignals, current: int) -> _Proposal:
    demand = signals.queued_prefill_tokens / config.prefill.target_queued_tokens_per_replica
    return _metric_proposal(demand / max(current, 1), demand, current, config.tolerance, ScaleReason.QUEUE_ABOVE_TARGET)


def _recommend_decode(config: AutoscalerConfig, signals: PoolSignals, current: int) -> _Proposal:
    demand = signals.waiting / config.decode.target_waiting_per_replica
    queue = _metric_proposal(
        demand / max(current, 1), demand, current, config.tolerance, ScaleReason.QUEUE_ABOVE_TARGET
    )
    kv_ratio = signals.kv_usage / config.decode.target_kv_usage
    kv = _metric_proposal(
        kv_ratio, kv_ratio * min(current, signals.num_workers), current, config.tolerance, ScaleReason.KV_ABOVE_TARGET
    )
    return max((queue, kv), key=lambda proposal: proposal.replicas)  # the first of equals: queue


_RECOMMEND = {WorkerRole.PREFILL: _recommend_prefill, WorkerRole.DECODE: _recommend_decode}


def _decide_pool(
    config: AutoscalerConfig, signals: PoolSignals, current: int, history: PoolHistory, now_s: float
) -> tuple[ScaleDecision, PoolHistory]:
    """Rules 1 to 4 of the module docstring for one pool."""
    role = signals.role
    bounds: PoolPolicy = config.prefill if role is WorkerRole.PREFILL else config.decode
    bounded = bounds.clamp(current)  # where the bounds alone put the pool
    bounds_reason = _bounds_reason(bounded, current)
    if not signals.fresh:
        return ScaleDecision(role, current, bounded, bounds_reason or _UNUSABLE[signals.status]), history
    proposal = _RECOMMEND[role](config, signals, current)
    target = bounds.clamp(proposal.replicas)
    reason = _bounds_reason(target, proposal.replicas) or proposal.reason
    history = history.record(now_s, target, config.stabilisation_window_s)
    if target > current:
        if history.changed_within(now_s, config.up_cooldown_s):
            return ScaleDecision(role, current, bounded, bounds_reason or ScaleReason.COOLDOWN), history
        return ScaleDecision(role, current, target, reason), history
    if target < current:
        stabilised = min(current, history.highest())  # every entry is clamped: <= max_replicas
        if stabilised == current:
            return ScaleDecision(role, current, current, ScaleReason.STABILISING), history
        if history.changed_within(now_s, config.down_cooldown_s):
            return ScaleDecision(role, current, bounded, bounds_reason or ScaleReason.COOLDOWN), history
        at_max = stabilised == bounds.max_replicas and current > bounds.max_replicas
        return ScaleDecision(
            role, current, stabilised, ScaleReason.ABOVE_MAX if at_max else ScaleReason.SCALE_DOWN
        ), history
    return ScaleDecision(role, current, current, reason), history


def _bounds_reason(clamped: int, unclamped: int) -> ScaleReason | None:
    if clamped > unclamped:
        return ScaleReason.BELOW_MIN
    return ScaleReason.ABOVE_MAX if clamped < unclamped else None


def _ratio_bounded(config: AutoscalerConfig, prefill: int, decode: int) -> tuple[int, int]:
    """(prefill, decode) moved into the ratio bounds: raise the smaller pool first (within its
    max), then lower the larger (within its min). Best effort when the bounds cannot all hold."""
    low, high = config.min_prefill_per_decode, config.max_prefill_per_decode
    if decode == 0:
        return prefill, decode  # no ratio to keep (decode min_replicas >= 1 makes this rare)
    if prefill < low * decode - _EPS:  # too few prefill replicas
        prefill = min(config.prefill.max_replicas, _ceil(low * decode))
        if prefill < low * decode - _EPS:
            decode = max(config.decode.min_replicas, _floor(prefill / low))
    elif prefill > high * decode + _EPS:  # too few decode replicas
        decode = min(config.decode.max_replicas, _ceil(prefill / high))
        if prefill > high * decode + _EPS:
            prefill = max(config.prefill.min_replicas, _floor(high * decode))
    return prefill, decode


def _planned(config: AutoscalerConfig, plan: float, prefill: int, decode: int) -> tuple[int, int]:
    """(prefill, decode) grown to follow the planned ratio (module docstring)."""
    decode = config.decode.clamp(max(decode, _ceil(prefill / plan)))
    return config.prefill.clamp(max(prefill, _ceil(plan * decode))), decode


def _moved(decisions: list[ScaleDecision], desired: tuple[int, int], reason: ScaleReason) -> list[ScaleDecision]:
    return [
        d if d.desired == n else dataclasses.replace(d, desired=n, reason=reason) for d, n in zip(decisions, desired)
    ]


def _with_planned_ratio(config: AutoscalerConfig, decisions: list[ScaleDecision]) -> list[ScaleDecision]:
    plan = config.planned_prefill_per_decode
    if plan is None:
        return decisions
    prefill, decode = decisions
    return _moved(decisions, _planned(config, plan, prefill.desired, decode.desired), ScaleReason.PLANNED_RATIO)


def _with_ratio_bounds(config: AutoscalerConfig, decisions: list[ScaleDecision]) -> list[ScaleDecision]:
    prefill, decode = decisions
    return _moved(decisions, _ratio_bounded(config, prefill.desired, decode.desired), ScaleReason.RATIO_BOUND)


def decide(
    config: AutoscalerConfig,
    signals: Mapping[WorkerRole, PoolSignals],
    current: Mapping[WorkerRole, int],
    state: PolicyState,
    now_s: float,
) -> tuple[list[ScaleDecision], PolicyState]:
    """One decision per pool, `[prefill, decode]`, and the state to pass to the next call.

    `signals` and `current` (the actuator's replica counts) must hold both roles. Pure: the same
    arguments give the same result.
    """
    decisions: list[ScaleDecision] = []
    for role in (WorkerRole.PREFILL, WorkerRole.DECODE):
        decision, history = _decide_pool(config, signals[role], current[role], state.pool(role), now_s)
        decisions.append(decision)
        state = state.with_pool(role, history)
    if all(signals[role].fresh for role in WorkerRole):
        decisions = _with_ratio_bounds(config, _with_planned_ratio(config, decisions))
    for decision in decisions:
        if decision.direction is not ScaleDirection.HOLD:
            state = state.with_pool(decision.role, dataclasses.replace(state.pool(decision.role), last_change_s=now_s))
    return decisions, state
