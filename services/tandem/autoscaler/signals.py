"""Per-pool scaling signals, read from the cluster state in Redis (`ClusterState`).

Workers publish a `load:{id}` hash on every heartbeat tick; `read_signals` sums those loads per
pool. What each pool is scaled on (`services/tandem/autoscaler/policy.py`):
- prefill: queued prefill tokens (prompt tokens not yet run), per replica;
- decode: waiting requests per replica, and KV cache use (blocks used / blocks total).

Freshness. A pool's signals are `FRESH` when every live worker of the pool (registered, key not
expired) has a load whose timestamp is at most `max_signal_age_s` before now. A live worker
without a load, or with an older one, makes the pool `STALE`: its totals then cover only the
workers that do have a load, and the policy will not scale the pool on them. A pool with no
live worker is `FRESH` with all-zero totals. If Redis cannot be read, both pools are `MISSING`
(all totals 0). A timestamp ahead of now (hosts' clocks disagree) counts as fresh.

`read_signals` never raises on a Redis error: the autoscaler loop must go on, and the policy
knows what to do with missing data.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from tandem.common.cluster_state import ClusterState
from tandem.common.workers import WorkerLoad, WorkerRole

logger = logging.getLogger(__name__)


class SignalStatus(str, enum.Enum):
    FRESH = "fresh"  # every live worker of the pool has a recent load
    STALE = "stale"  # some live worker has no load, or an old one
    MISSING = "missing"  # Redis could not be read


@dataclass(frozen=True)
class PoolSignals:
    """One pool's load, summed over its live workers' published loads."""

    role: WorkerRole
    status: SignalStatus
    num_workers: int = 0  # live workers of the pool (with or without a load)
    queued_prefill_tokens: int = 0
    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.role, WorkerRole):
            raise ValueError(f"role must be a WorkerRole, got {self.role!r}")
        if not isinstance(self.status, SignalStatus):
            raise ValueError(f"status must be a SignalStatus, got {self.status!r}")
        for name in ("num_workers", "queued_prefill_tokens", "waiting", "running", "kv_blocks_used", "kv_blocks_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.kv_blocks_used > self.kv_blocks_total:
            raise ValueError("kv_blocks_used must be <= kv_blocks_total")

    @classmethod
    def missing(cls, role: WorkerRole) -> PoolSignals:
        """Nothing known about the pool (Redis unreadable)."""
        return cls(role, SignalStatus.MISSING)

    @property
    def fresh(self) -> bool:
        return self.status is SignalStatus.FRESH

    @property
    def kv_usage(self) -> float:
        """Fraction of the pool's KV blocks in use, in [0, 1] (0 when it has none)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def pool_signals(
    role: WorkerRole, loads: Mapping[str, WorkerLoad | None], now_s: float, max_signal_age_s: float
) -> PoolSignals:
    """The signals of one pool from its live workers' loads (worker id -> load, None if the
    worker has published none). Pure."""
    present = [load for load in loads.values() if load is not None]
    complete = len(present) == len(loads) and all(now_s - load.timestamp_s <= max_signal_age_s for load in present)
    return PoolSignals(
        role=role,
        status=SignalStatus.FRESH if complete else SignalStatus.STALE,
        num_workers=len(loads),
        queued_prefill_tokens=sum(load.queued_prefill_tokens for load in present),
        waiting=sum(load.waiting for load in present),
        running=sum(load.running for load in present),
        kv_blocks_used=sum(load.kv_blocks_used for load in present),
        kv_blocks_total=sum(load.kv_blocks_total for load in present),
    )


def read_signals(state: ClusterState, now_s: float, max_signal_age_s: float) -> dict[WorkerRole, PoolSignals]:
    """Both pools' signals, from two Redis round trips (the live workers, then their loads).

    Called by the autoscaler loop once per step. Never raises on Redis errors: it logs a
    warning and returns `MISSING` signals for both pools.
    """
    if not max_signal_age_s > 0:
        raise ValueError(f"max_signal_age_s must be > 0, got {max_signal_age_s!r}")
    try:
        workers = state.list_workers()
        loads = state.get_loads(worker.worker_id for worker in workers)
    except (redis.RedisError, OSError) as exc:
        logger.warning("cannot read worker loads from Redis; signals are missing: %s", exc)
        return {role: PoolSignals.missing(role) for role in WorkerRole}
    return {
        role: pool_signals(
            role, {w.worker_id: loads.get(w.worker_id) for w in workers if w.role is role}, now_s, max_signal_age_s
        )
        for role in WorkerRole
    }
