"""P:D-ratio-aware scaling: with `planned_prefill_per_decode`, both pools follow the plan as load
changes, within the replica bounds and the ratio bounds. Tables: signals and current replicas
in, exact (desired, reason) per pool out."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tandem.autoscaler.config import AutoscalerConfig, DecodePolicy, PrefillPolicy
from tandem.autoscaler.policy import PolicyState, PoolHistory, Recommendation, ScaleReason, decide
from tandem.autoscaler.signals import PoolSignals, SignalStatus
from tandem.common.workers import WorkerRole

P, D = WorkerRole.PREFILL, WorkerRole.DECODE
R = ScaleReason
NOW_S = 1000.0


def config(plan: float | None = 0.5, prefill_max: int = 10, decode_max: int = 10, **overrides: Any) -> AutoscalerConfig:
    """Prefill 0..prefill_max at 1000 queued tokens per replica; decode 1..decode_max at 4
    waiting per replica; 60 s window, 30 s up / 45 s down cooldowns, 10 % tolerance."""
    return AutoscalerConfig(
        prefill=PrefillPolicy(min_replicas=0, max_replicas=prefill_max, target_queued_tokens_per_replica=1000),
        decode=DecodePolicy(min_replicas=1, max_replicas=decode_max, target_waiting_per_replica=4.0),
        stabilisation_window_s=60.0,
        up_cooldown_s=30.0,
        down_cooldown_s=45.0,
        planned_prefill_per_decode=plan,
        **overrides,
    )


def signals(
    queued: int, waiting: int, prefill_status: SignalStatus = SignalStatus.FRESH
) -> dict[WorkerRole, PoolSignals]:
    return {
        P: PoolSignals(P, prefill_status, num_workers=1, queued_prefill_tokens=queued),
        D: PoolSignals(D, SignalStatus.FRESH, num_workers=1, waiting=waiting, kv_blocks_total=100),
    }


Row = tuple[
    str, AutoscalerConfig, tuple[int, int], dict[WorkerRole, PoolSignals], PolicyState, tuple[int, R], tuple[int, R]
]
EMPTY = PolicyState()
DECODE_SAID_4 = PolicyState(decode=PoolHistory((Recommendation(NOW_S - 10, 4),)))  # within the window
PREFILL_JUST_CHANGED = PolicyState(prefill=PoolHistory(last_change_s=NOW_S - 10))  # within the up cooldown

ROWS: list[Row] = [
    # name, config, (prefill, decode) now, signals, state -> prefill (desired, reason), decode (desired, reason)
    (
        "decode load rises: prefill follows",
        config(),
        (1, 2),
        signals(1000, 16),
        EMPTY,
        (2, R.PLANNED_RATIO),
        (4, R.QUEUE_ABOVE_TARGET),
    ),
    (
        "prefill load rises: decode follows",
        config(),
        (1, 2),
        signals(3000, 8),
        EMPTY,
        (3, R.QUEUE_ABOVE_TARGET),
        (6, R.PLANNED_RATIO),
    ),
    (
        "an idle prefill queue still gets its planned share",
        config(),
        (0, 4),
        signals(0, 16),
        EMPTY,
        (2, R.PLANNED_RATIO),
        (4, R.WITHIN_TOLERANCE),
    ),
    (
        "without a plan the pools scale alone",
        config(plan=None),
        (0, 4),
        signals(0, 16),
        EMPTY,
        (0, R.AT_TARGET),
        (4, R.WITHIN_TOLERANCE),
    ),
    (
        "decode capped at its max",
        config(decode_max=5),
        (1, 2),
        signals(5000, 8),
        EMPTY,
        (5, R.QUEUE_ABOVE_TARGET),
        (5, R.PLANNED_RATIO),
    ),
    (
        "prefill capped at its max",
        config(prefill_max=2),
        (1, 2),
        signals(1000, 32),
        EMPTY,
        (2, R.PLANNED_RATIO),
        (8, R.QUEUE_ABOVE_TARGET),
    ),
    (
        "load falls: the pair shrinks along the plan",
        config(),
        (2, 4),
        signals(0, 8),
        EMPTY,
        (1, R.PLANNED_RATIO),
        (2, R.SCALE_DOWN),
    ),
    (
        "decode stabilising keeps its prefill share",
        config(),
        (2, 4),
        signals(0, 8),
        DECODE_SAID_4,
        (2, R.PLANNED_RATIO),
        (4, R.STABILISING),
    ),
    (
        "the plan overrides an up-cooldown",
        config(),
        (1, 2),
        signals(1000, 16),
        PREFILL_JUST_CHANGED,
        (2, R.PLANNED_RATIO),
        (4, R.QUEUE_ABOVE_TARGET),
    ),
    (
        "stale prefill signals: no plan, no ratio",
        config(),
        (1, 2),
        signals(0, 16, SignalStatus.STALE),
        EMPTY,
        (1, R.STALE_SIGNALS),
        (4, R.QUEUE_ABOVE_TARGET),
    ),
    # plan 0.3 of 4 decode rounds up to 2 prefill, above the 0.4 bound: decode rises to 2 / 0.4 = 5
    (
        "ratio bounds win over the plan's rounding",
        config(plan=0.3, max_prefill_per_decode=0.4),
        (1, 4),
        signals(0, 16),
        EMPTY,
        (2, R.PLANNED_RATIO),
        (5, R.RATIO_BOUND),
    ),
]


@pytest.mark.parametrize(
    ("name", "cfg", "current", "sig", "state", "want_prefill", "want_decode"), ROWS, ids=[r[0] for r in ROWS]
)
def test_planned_ratio_decisions(
    name: str,
    cfg: AutoscalerConfig,
    current: tuple[int, int],
    sig: dict[WorkerRole, PoolSignals],
    state: PolicyState,
    want_prefill: tuple[int, R],
    want_decode: tuple[int, R],
) -> None:
    decisions, _ = decide(cfg, sig, {P: current[0], D: current[1]}, state, NOW_S)
    assert [(d.role, d.desired, d.reason) for d in decisions] == [(P, *want_prefill), (D, *want_decode)]


def test_following_a_load_ramp_keeps_the_planned_ratio() -> None:
    """Decode demand ramps 1 -> 8 -> 1 replicas (steps 70 s apart: past cooldowns and window);
    the prefill pool tracks ceil(0.5 x decode) both ways."""
    cfg = config()
    current, state, seen = {P: 1, D: 1}, PolicyState(), []
    for step, replicas in enumerate((1, 2, 4, 8, 4, 2, 1)):
        decisions, state = decide(cfg, signals(0, 4 * replicas), current, state, NOW_S + 70 * step)
        current = {d.role: d.desired for d in decisions}
        seen.append((current[P], current[D]))
    assert seen == [(1, 1), (1, 2), (2, 4), (4, 8), (2, 4), (1, 2), (1, 1)]
    assert all(p == math.ceil(0.5 * d) for p, d in seen)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"planned_prefill_per_decode": 0.0}, "planned_prefill_per_decode must be a finite number > 0.0, got 0.0"),
        ({"planned_prefill_per_decode": math.inf}, "planned_prefill_per_decode must be a finite number > 0.0, got inf"),
        (
            {"planned_prefill_per_decode": 2.0, "max_prefill_per_decode": 1.5},
            "planned_prefill_per_decode (2.0) must be within "
            "[min_prefill_per_decode, max_prefill_per_decode] = [0.0, 1.5]",
        ),
    ],
)
def test_a_bad_plan_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        AutoscalerConfig(**overrides)
    assert str(err.value) == message
