"""The autoscaling policy as tables: signals, current replicas and history in, exact
(desired replicas, reason) per pool out. Sequences thread the returned state step by step."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest

from tandem.autoscaler.config import AutoscalerConfig, DecodePolicy, PrefillPolicy
from tandem.autoscaler.policy import (
    PolicyState,
    PoolHistory,
    Recommendation,
    ScaleDecision,
    ScaleDirection,
    ScaleReason,
    decide,
)
from tandem.autoscaler.signals import PoolSignals, SignalStatus
from tandem.common.workers import WorkerRole

P, D = WorkerRole.PREFILL, WorkerRole.DECODE
R = ScaleReason
FRESH, STALE, MISSING = SignalStatus.FRESH, SignalStatus.STALE, SignalStatus.MISSING
NOW_S = 1000.0


def config(
    prefill: dict[str, Any] | None = None, decode: dict[str, Any] | None = None, **overrides: Any
) -> AutoscalerConfig:
    """Prefill 0..10 at 1000 queued tokens per replica; decode 1..10 at 4 waiting and 80 % KV;
    60 s window, 30 s up / 45 s down cooldowns, 10 % tolerance, no ratio bounds."""
    base: dict[str, Any] = dict(stabilisation_window_s=60.0, up_cooldown_s=30.0, down_cooldown_s=45.0, tolerance=0.1)
    return AutoscalerConfig(
        prefill=PrefillPolicy(
            **{"min_replicas": 0, "max_replicas": 10, "target_queued_tokens_per_replica": 1000, **(prefill or {})}
        ),
        decode=DecodePolicy(
            **{
                "min_replicas": 1,
                "max_replicas": 10,
                "target_waiting_per_replica": 4.0,
                "target_kv_usage": 0.8,
                **(decode or {}),
            }
        ),
        **{**base, **overrides},
    )


def prefill(queued: int = 0, status: SignalStatus = FRESH) -> PoolSignals:
    return PoolSignals(P, status, num_workers=1, queued_prefill_tokens=queued)


def decode(waiting: int = 0, kv_used: int = 0, status: SignalStatus = FRESH, workers: int = 1) -> PoolSignals:
    """KV use in percent: `kv_used` of `workers` x 100 blocks."""
    return PoolSignals(
        D, status, num_workers=workers, waiting=waiting, kv_blocks_used=kv_used * workers, kv_blocks_total=100 * workers
    )


def changed_at(last_change_s: float | None, *recommendations: tuple[float, int]) -> PoolHistory:
    return PoolHistory(tuple(Recommendation(at, n) for at, n in recommendations), last_change_s)


# The other pool of a one-pool row sits still: prefill idle at 0, decode exactly on target at 1.
IDLE_PREFILL, PREFILL_AT_0 = prefill(0), 0
STEADY_DECODE, DECODE_AT_1 = decode(waiting=4), 1


def decide_one(
    role: WorkerRole,
    cfg: AutoscalerConfig,
    signals: PoolSignals,
    current: int,
    history: PoolHistory = PoolHistory(),  # noqa: B008 (frozen, never mutated)
    now_s: float = NOW_S,
) -> tuple[int, ScaleReason]:
    """(desired, reason) of `role`'s pool; the other pool sits still and must hold."""
    other = D if role is P else P
    still = {P: (IDLE_PREFILL, PREFILL_AT_0, R.AT_TARGET), D: (STEADY_DECODE, DECODE_AT_1, R.WITHIN_TOLERANCE)}
    other_signals, other_current, other_reason = still[other]
    decisions, _ = decide(
        cfg,
        {role: signals, other: other_signals},
        {role: current, other: other_current},
        PolicyState().with_pool(role, history),
        now_s,
    )
    mine, theirs = decisions if role is P else decisions[::-1]
    assert theirs == ScaleDecision(other, other_current, other_current, other_reason)
    return mine.desired, mine.reason


def decide_prefill(*args: Any) -> tuple[int, ScaleReason]:
    return decide_one(P, *args)


def decide_decode(*args: Any) -> tuple[int, ScaleReason]:
    return decide_one(D, *args)


# --- prefill: queued prefill tokens per replica, tolerance, bounds ----------------------------


@pytest.mark.parametrize(
    ("cfg", "queued", "current", "expected"),
    [
        pytest.param(config(), 3500, 1, (4, R.QUEUE_ABOVE_TARGET), id="up-immediate"),
        pytest.param(config(), 1, 0, (1, R.QUEUE_ABOVE_TARGET), id="up-from-zero"),
        pytest.param(config(), 0, 0, (0, R.AT_TARGET), id="idle-at-zero"),
        pytest.param(config(), 2200, 2, (2, R.WITHIN_TOLERANCE), id="tolerance-upper-edge"),
        pytest.param(config(), 2201, 2, (3, R.QUEUE_ABOVE_TARGET), id="just-above-tolerance"),
        pytest.param(config(), 1800, 2, (2, R.WITHIN_TOLERANCE), id="tolerance-lower-edge"),
        pytest.param(config(), 1799, 2, (2, R.AT_TARGET), id="below-tolerance-rounds-up-to-current"),
        pytest.param(config(), 3300, 4, (4, R.AT_TARGET), id="rounding-up-gives-current"),
        pytest.param(config(tolerance=0.0), 2001, 2, (3, R.QUEUE_ABOVE_TARGET), id="zero-tolerance"),
        pytest.param(config(), 1000, 4, (1, R.SCALE_DOWN), id="down-without-history"),
        pytest.param(config(), 0, 3, (0, R.SCALE_DOWN), id="down-to-zero"),
        pytest.param(config(), 25_000, 8, (10, R.ABOVE_MAX), id="up-capped-at-max"),
        pytest.param(config(), 25_000, 10, (10, R.ABOVE_MAX), id="at-max-holds"),
        pytest.param(config(), 11_000, 12, (10, R.ABOVE_MAX), id="pool-above-max-lowered"),
        pytest.param(config(prefill={"min_replicas": 2}), 0, 2, (2, R.BELOW_MIN), id="at-min-holds"),
        pytest.param(config(prefill={"min_replicas": 2}), 0, 1, (2, R.BELOW_MIN), id="pool-below-min-raised"),
        pytest.param(config(prefill={"min_replicas": 2}), 0, 4, (2, R.SCALE_DOWN), id="down-stops-at-min"),
    ],
)
def test_prefill_recommendation(cfg, queued, current, expected):
    assert decide_prefill(cfg, prefill(queued), current) == expected


# --- decode: the larger of waiting per replica and KV use -------------------------------------


@pytest.mark.parametrize(
    ("waiting", "kv_used", "current", "workers", "expected"),
    [
        pytest.param(20, 50, 2, 2, (5, R.QUEUE_ABOVE_TARGET), id="queue-up"),
        pytest.param(8, 95, 2, 2, (3, R.KV_ABOVE_TARGET), id="kv-up"),
        pytest.param(12, 100, 4, 4, (5, R.KV_ABOVE_TARGET), id="kv-asks-more-than-queue"),
        pytest.param(20, 100, 4, 4, (5, R.QUEUE_ABOVE_TARGET), id="tie-goes-to-queue"),
        pytest.param(0, 85, 2, 2, (2, R.WITHIN_TOLERANCE), id="kv-within-tolerance-holds"),
        pytest.param(8, 10, 2, 2, (2, R.WITHIN_TOLERANCE), id="queue-within-tolerance-holds"),
        pytest.param(4, 20, 4, 4, (1, R.SCALE_DOWN), id="both-low-down"),
        pytest.param(0, 0, 1, 1, (1, R.BELOW_MIN), id="idle-at-min"),
        pytest.param(0, 0, 0, 0, (1, R.BELOW_MIN), id="empty-pool-raised-to-min"),
        pytest.param(400, 100, 6, 6, (10, R.ABOVE_MAX), id="up-capped-at-max"),
        pytest.param(0, 95, 3, 2, (3, R.AT_TARGET), id="starting-replicas-hold-no-kv"),
        pytest.param(0, 95, 2, 5, (3, R.KV_ABOVE_TARGET), id="kv-counts-at-most-current"),
    ],
)
def test_decode_recommendation(waiting, kv_used, current, workers, expected):
    assert decide_decode(config(), decode(waiting, kv_used, workers=workers), current) == expected


# --- cooldowns: last change at t=1000; up cooldown 30 s, down cooldown 45 s -------------------


@pytest.mark.parametrize(
    ("cfg", "queued", "current", "now_s", "expected"),
    [
        pytest.param(config(), 5000, 2, 1020.0, (2, R.COOLDOWN), id="up-held-by-up-cooldown"),
        pytest.param(config(), 5000, 2, 1029.9, (2, R.COOLDOWN), id="up-held-just-before-end"),
        pytest.param(config(), 5000, 2, 1030.0, (5, R.QUEUE_ABOVE_TARGET), id="up-when-up-cooldown-over"),
        pytest.param(config(), 5000, 2, 1035.0, (5, R.QUEUE_ABOVE_TARGET), id="down-cooldown-does-not-hold-up"),
        pytest.param(config(), 0, 4, 1040.0, (4, R.COOLDOWN), id="down-held-by-down-cooldown"),
        pytest.param(config(), 0, 4, 1045.0, (0, R.SCALE_DOWN), id="down-when-down-cooldown-over"),
        pytest.param(
            config(prefill={"min_replicas": 2}),
            5000,
            1,
            1010.0,
            (2, R.BELOW_MIN),
            id="below-min-raised-during-cooldown",
        ),
        pytest.param(config(), 0, 12, 1010.0, (10, R.ABOVE_MAX), id="above-max-lowered-during-cooldown"),
    ],
)
def test_cooldowns(cfg, queued, current, now_s, expected):
    assert decide_prefill(cfg, prefill(queued), current, changed_at(1000.0), now_s) == expected


# --- sequences: (now_s, queued prefill tokens, current) -> (desired, reason), state threaded ---

STABILISED_DOWN = [  # 60 s window; cooldowns 0: the window alone holds the pool
    (0.0, 4000, 1, 4, R.QUEUE_ABOVE_TARGET),
    (15.0, 4000, 4, 4, R.WITHIN_TOLERANCE),
    (30.0, 1000, 4, 4, R.STABILISING),  # wants 1; 4 is in the window
    (45.0, 2000, 4, 4, R.STABILISING),  # wants 2
    (60.0, 1000, 4, 4, R.STABILISING),  # t=0's 4 left the window, t=15's 4 has not
    (75.0, 1000, 4, 2, R.SCALE_DOWN),  # window: 1, 2, 1, 1 -> its highest, 2
    (90.0, 1000, 2, 2, R.STABILISING),  # t=45's 2 still in the window
    (105.0, 1000, 2, 1, R.SCALE_DOWN),
    (120.0, 1000, 1, 1, R.WITHIN_TOLERANCE),
]
UP_COOLDOWN = [  # 30 s up cooldown: new replicas get time to start
    (0.0, 2000, 1, 2, R.QUEUE_ABOVE_TARGET),
    (10.0, 5000, 2, 2, R.COOLDOWN),
    (29.0, 5000, 2, 2, R.COOLDOWN),
    (30.0, 5000, 2, 5, R.QUEUE_ABOVE_TARGET),
    (40.0, 9000, 5, 5, R.COOLDOWN),
    (60.0, 9000, 5, 9, R.QUEUE_ABOVE_TARGET),
]
DOWN_COOLDOWN = [  # no window; 45 s down cooldown after a change in either direction
    (0.0, 4000, 1, 4, R.QUEUE_ABOVE_TARGET),
    (10.0, 0, 4, 4, R.COOLDOWN),
    (44.0, 0, 4, 4, R.COOLDOWN),
    (45.0, 0, 4, 0, R.SCALE_DOWN),
    (50.0, 3000, 0, 0, R.COOLDOWN),  # the up cooldown follows a change in either direction too
    (75.0, 3000, 0, 3, R.QUEUE_ABOVE_TARGET),
]


@pytest.mark.parametrize(
    ("cfg", "steps"),
    [
        pytest.param(config(up_cooldown_s=0.0, down_cooldown_s=0.0), STABILISED_DOWN, id="stabilised-scale-down"),
        pytest.param(config(stabilisation_window_s=0.0), UP_COOLDOWN, id="up-cooldown"),
        pytest.param(config(stabilisation_window_s=0.0), DOWN_COOLDOWN, id="down-cooldown"),
    ],
)
def test_sequences(cfg, steps):
    state = PolicyState()
    for now_s, queued, current, desired, reason in steps:
        decisions, state = decide(
            cfg, {P: prefill(queued), D: STEADY_DECODE}, {P: current, D: DECODE_AT_1}, state, now_s
        )
        assert (now_s, decisions[0]) == (now_s, ScaleDecision(P, current, desired, reason))
        if desired != current:
            assert state.prefill.last_change_s == now_s


def test_window_keeps_only_recent_recommendations():
    _, state = decide(
        config(),
        {P: prefill(3000), D: STEADY_DECODE},
        {P: 3, D: 1},
        PolicyState(prefill=changed_at(None, (900.0, 7), (940.0, 6), (941.0, 5))),
        NOW_S,
    )
    assert state.prefill == changed_at(None, (941.0, 5), (NOW_S, 3))  # 60 s old is out
    assert state.decode == changed_at(None, (NOW_S, 1))


def test_seeded_state_holds_a_scale_down_for_one_window():
    state = PolicyState.seeded({P: 4, D: 1}, 0.0)
    assert state.prefill == changed_at(None, (0.0, 4))
    cfg = config(up_cooldown_s=0.0, down_cooldown_s=0.0)
    decisions, state = decide(cfg, {P: prefill(0), D: STEADY_DECODE}, {P: 4, D: 1}, state, 59.0)
    assert decisions[0] == ScaleDecision(P, 4, 4, R.STABILISING)
    decisions, state = decide(cfg, {P: prefill(0), D: STEADY_DECODE}, {P: 4, D: 1}, state, 60.0)
    assert decisions[0] == ScaleDecision(P, 4, 0, R.SCALE_DOWN)


# --- stale and missing signals: never down, never up; only the bounds act ----------------------


@pytest.mark.parametrize(
    ("role", "signals", "current", "expected"),
    [
        pytest.param(P, prefill(0, STALE), 4, (4, R.STALE_SIGNALS), id="stale-never-down"),
        pytest.param(P, prefill(90_000, STALE), 1, (1, R.STALE_SIGNALS), id="stale-never-up"),
        pytest.param(D, decode(0, 0, MISSING), 3, (3, R.MISSING_SIGNALS), id="missing-never-down"),
        pytest.param(D, decode(400, 100, MISSING), 3, (3, R.MISSING_SIGNALS), id="missing-never-up"),
        pytest.param(D, decode(0, 0, MISSING), 0, (1, R.BELOW_MIN), id="missing-below-min-raised"),
        pytest.param(P, prefill(0, MISSING), 12, (10, R.ABOVE_MAX), id="missing-above-max-lowered"),
        pytest.param(D, decode(400, 100, STALE), 0, (1, R.BELOW_MIN), id="stale-raised-only-to-min"),
    ],
)
def test_unusable_signals(role, signals, current, expected):
    assert decide_one(role, config(), signals, current) == expected


def test_unusable_signals_record_nothing():
    history = changed_at(900.0, (950.0, 6))
    _, state = decide(
        config(),
        {P: prefill(0, STALE), D: decode(0, 0, MISSING)},
        {P: 6, D: 2},
        PolicyState(prefill=history, decode=history),
        NOW_S,
    )
    assert state == PolicyState(prefill=history, decode=history)


# --- P:D ratio bounds: (prefill queued, current), (decode waiting, current) -> both decisions -----


@pytest.mark.parametrize(
    ("cfg", "p_in", "d_in", "expected"),
    [
        pytest.param(
            config(min_prefill_per_decode=0.5),
            (0, 1),
            (24, 2),
            [ScaleDecision(P, 1, 3, R.RATIO_BOUND), ScaleDecision(D, 2, 6, R.QUEUE_ABOVE_TARGET)],
            id="min-ratio-raises-prefill",
        ),
        pytest.param(
            config(min_prefill_per_decode=0.5, prefill={"max_replicas": 2}),
            (0, 1),
            (24, 2),
            [ScaleDecision(P, 1, 2, R.RATIO_BOUND), ScaleDecision(D, 2, 4, R.RATIO_BOUND)],
            id="min-ratio-prefill-at-max-lowers-decode",
        ),
        pytest.param(
            config(min_prefill_per_decode=1.0, prefill={"max_replicas": 2}),
            (5000, 2),
            (20, 2),
            [ScaleDecision(P, 2, 2, R.ABOVE_MAX), ScaleDecision(D, 2, 2, R.RATIO_BOUND)],
            id="min-ratio-holds-decode-up",
        ),
        pytest.param(
            config(max_prefill_per_decode=2.0),
            (8000, 4),
            (8, 2),
            [ScaleDecision(P, 4, 8, R.QUEUE_ABOVE_TARGET), ScaleDecision(D, 2, 4, R.RATIO_BOUND)],
            id="max-ratio-raises-decode",
        ),
        pytest.param(
            config(max_prefill_per_decode=2.0, decode={"max_replicas": 3}),
            (8000, 4),
            (8, 2),
            [ScaleDecision(P, 4, 6, R.RATIO_BOUND), ScaleDecision(D, 2, 3, R.RATIO_BOUND)],
            id="max-ratio-decode-at-max-lowers-prefill",
        ),
        pytest.param(
            config(min_prefill_per_decode=0.5, max_prefill_per_decode=2.0),
            (2000, 2),
            (8, 2),
            [ScaleDecision(P, 2, 2, R.WITHIN_TOLERANCE), ScaleDecision(D, 2, 2, R.WITHIN_TOLERANCE)],
            id="within-bounds-untouched",
        ),
        pytest.param(
            config(min_prefill_per_decode=0.3),
            (0, 0),
            (40, 10),
            [ScaleDecision(P, 0, 3, R.RATIO_BOUND), ScaleDecision(D, 10, 10, R.WITHIN_TOLERANCE)],
            id="fractional-ratio-rounds-exactly",
        ),
        pytest.param(
            config(min_prefill_per_decode=1.0),
            (0, 1, STALE),
            (24, 2),
            [ScaleDecision(P, 1, 1, R.STALE_SIGNALS), ScaleDecision(D, 2, 6, R.QUEUE_ABOVE_TARGET)],
            id="not-applied-with-stale-prefill",
        ),
        pytest.param(
            config(max_prefill_per_decode=1.0),
            (8000, 4),
            (0, 2, MISSING),
            [ScaleDecision(P, 4, 8, R.QUEUE_ABOVE_TARGET), ScaleDecision(D, 2, 2, R.MISSING_SIGNALS)],
            id="not-applied-with-missing-decode",
        ),
    ],
)
def test_ratio_bounds(cfg, p_in, d_in, expected):
    p_queued, p_current, *p_status = p_in
    d_waiting, d_current, *d_status = d_in
    signals = {P: prefill(p_queued, *p_status), D: decode(d_waiting, 0, *d_status)}
    decisions, state = decide(cfg, signals, {P: p_current, D: d_current}, PolicyState(), NOW_S)
    assert decisions == expected
    for decision in decisions:
        changed = decision.desired != decision.current
        assert state.pool(decision.role).last_change_s == (NOW_S if changed else None)


def test_decision_direction():
    assert [ScaleDecision(P, 1, n, R.AT_TARGET).direction for n in (2, 0, 1)] == [
        ScaleDirection.UP,
        ScaleDirection.DOWN,
        ScaleDirection.HOLD,
    ]
    with pytest.raises(ValueError, match="^desired must be an int >= 0, got -1$"):
        ScaleDecision(P, 1, -1, R.AT_TARGET)


# --- config validation: exact messages ----------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        pytest.param(
            lambda: PrefillPolicy(min_replicas=3, max_replicas=2),
            "min_replicas (3) must be <= max_replicas (2)",
            id="min-above-max",
        ),
        pytest.param(
            lambda: PrefillPolicy(min_replicas=-1), "min_replicas must be an int >= 0, got -1", id="negative-min"
        ),
        pytest.param(
            lambda: PrefillPolicy(min_replicas=True), "min_replicas must be an int >= 0, got True", id="bool-min"
        ),
        pytest.param(lambda: PrefillPolicy(max_replicas=0), "max_replicas must be an int >= 1, got 0", id="zero-max"),
        pytest.param(
            lambda: PrefillPolicy(max_replicas=2.5), "max_replicas must be an int >= 1, got 2.5", id="float-max"
        ),
        pytest.param(
            lambda: PrefillPolicy(target_queued_tokens_per_replica=0),
            "target_queued_tokens_per_replica must be an int >= 1, got 0",
            id="zero-queued-target",
        ),
        pytest.param(
            lambda: DecodePolicy(min_replicas=0),
            "decode min_replicas must be >= 1 (no decode worker means no completions), got 0",
            id="decode-min-zero",
        ),
        pytest.param(
            lambda: DecodePolicy(target_waiting_per_replica=0),
            "target_waiting_per_replica must be a finite number > 0.0, got 0",
            id="zero-waiting-target",
        ),
        pytest.param(
            lambda: DecodePolicy(target_kv_usage=1.5),
            "target_kv_usage is a fraction in (0, 1], got 1.5",
            id="kv-target-above-one",
        ),
        pytest.param(
            lambda: DecodePolicy(target_kv_usage=math.nan),
            "target_kv_usage must be a finite number > 0.0, got nan",
            id="kv-target-nan",
        ),
        pytest.param(
            lambda: AutoscalerConfig(interval_s=0),
            "interval_s must be a finite number > 0.0, got 0",
            id="zero-interval",
        ),
        pytest.param(
            lambda: AutoscalerConfig(max_signal_age_s=math.inf),
            "max_signal_age_s must be a finite number > 0.0, got inf",
            id="infinite-signal-age",
        ),
        pytest.param(
            lambda: AutoscalerConfig(stabilisation_window_s=-1.0),
            "stabilisation_window_s must be a finite number >= 0.0, got -1.0",
            id="negative-window",
        ),
        pytest.param(
            lambda: AutoscalerConfig(down_cooldown_s="60"),
            "down_cooldown_s must be a finite number >= 0.0, got '60'",
            id="string-cooldown",
        ),
        pytest.param(
            lambda: AutoscalerConfig(min_prefill_per_decode=2.0, max_prefill_per_decode=1.0),
            "min_prefill_per_decode (2.0) must be <= max_prefill_per_decode (1.0)",
            id="ratios-unordered",
        ),
        pytest.param(
            lambda: AutoscalerConfig(max_prefill_per_decode=0.0),
            "max_prefill_per_decode must be a number > 0.0, got 0.0",
            id="zero-max-ratio",
        ),
        pytest.param(
            lambda: AutoscalerConfig(min_prefill_per_decode=-0.5),
            "min_prefill_per_decode must be a finite number >= 0.0, got -0.5",
            id="negative-min-ratio",
        ),
        pytest.param(
            lambda: AutoscalerConfig(tolerance=1.0), "tolerance is a fraction in [0, 1), got 1.0", id="tolerance-one"
        ),
        pytest.param(
            lambda: AutoscalerConfig(prefill=DecodePolicy()),
            "prefill must be a PrefillPolicy, got DecodePolicy(min_replicas=1, max_replicas=4, "
            "target_waiting_per_replica=4.0, target_kv_usage=0.8)",
            id="wrong-pool-policy",
        ),
        pytest.param(
            lambda: AutoscalerConfig(prefill=PrefillPolicy(min_replicas=5, max_replicas=8), max_prefill_per_decode=1.0),
            "prefill min_replicas (5) exceeds max_prefill_per_decode (1.0) x decode max_replicas (4); "
            "raise the ratio or decode max_replicas, or lower prefill min_replicas",
            id="max-ratio-unreachable",
        ),
        pytest.param(
            lambda: AutoscalerConfig(decode=DecodePolicy(min_replicas=3), min_prefill_per_decode=2.0),
            "min_prefill_per_decode (2.0) x decode min_replicas (3) exceeds prefill max_replicas (4); "
            "lower the ratio or decode min_replicas, or raise prefill max_replicas",
            id="min-ratio-unreachable",
        ),
    ],
)
def test_config_validation(build, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build()


def test_config_defaults_are_valid_and_unbounded_ratio():
    cfg = AutoscalerConfig()
    assert (
        cfg.prefill.min_replicas,
        cfg.decode.min_replicas,
        cfg.min_prefill_per_decode,
        cfg.max_prefill_per_decode,
    ) == (1, 1, 0.0, math.inf)
    assert dataclasses.replace(cfg, prefill=PrefillPolicy(min_replicas=0)).prefill.min_replicas == 0
