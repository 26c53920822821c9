"""The scheduler's configuration, frozen and validated once.

It imports `policies` to check the policy name against the registry; the policies read the
config only through their `PolicyConfig` protocol, so the import goes one way
(types <- policies <- config <- picker <- scheduler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tandem.scheduler.policies import POLICIES

POLICY_NAMES: tuple[str, ...] = tuple(sorted(POLICIES))  # the `--policy` choices


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's configuration, validated once.

    - `policy`: name of the routing policy (`policies.POLICIES`).
    - `block_size`: tokens per block; must equal the workers' block size.
    - `local_prefill_max_tokens`: conditional disaggregation. If the prompt's uncached tokens
      at the chosen decode worker are < this, D prefills locally. 0: always disaggregate when
      a fingerprint-compatible prefill worker is live.
    - `queue_weight`, `kv_weight`: weights of the load terms of the prefix-aware cost
      (token units; see `policies.PrefixAware`).
    - `refresh_interval_s`: period of the registry refresher (worker list + loads).
    - `speculative_ttl_s`: life of the speculative index entries added at routing time (the
      worker's KV events confirm the blocks meanwhile). 0 disables speculative entries.
    - `kv_events_block_ms`: how long one XREAD of the KV event follower blocks.
    - `stale_grace_s`: while Redis is unreachable the registry keeps its last view, but a
      worker whose heartbeat could not be confirmed for longer than this is stale: never
      routed to. Also the most a worker missing from Redis is kept in the recovery window.
    - `recovery_window_s`: after Redis answers again, a worker missing from it (its key expired
      during a freeze, or Redis restarted empty) is kept this long, so that it can register
      again (workers retry every 0.2 s) before gateways drop it.
    - `affinity_ttl_s`: how long a session's affinity to its decode worker lasts after its last
      request (affinity.py; a Redis expiry). 0 disables session affinity.
    - `affinity_max_waiting`, `affinity_max_kv_usage`: the load limits of the session's
      worker; over either, the policy decides as without a session and the affinity moves.
    """

    policy: str = field(default="prefix_aware", metadata={"choices": POLICY_NAMES, "help": "routing policy"})
    block_size: int = field(default=16, metadata={"help": "must equal the workers' block size"})
    local_prefill_max_tokens: int = field(
        default=256, metadata={"help": "uncached prompt tokens under which the decode worker prefills locally"}
    )
    queue_weight: float = field(default=1.0, metadata={"help": "weight of queued tokens in the prefix-aware cost"})
    kv_weight: float = field(default=1.0, metadata={"help": "weight of KV use in the prefix-aware cost"})
    refresh_interval_s: float = field(default=0.25, metadata={"help": "period of the worker registry refresh"})
    speculative_ttl_s: float = field(
        default=10.0, metadata={"help": "life of speculative prefix index entries (0: none)"}
    )
    kv_events_block_ms: int = field(default=500, metadata={"help": "how long one read of the KV events blocks"})
    stale_grace_s: float = field(
        default=60.0, metadata={"help": "a worker unconfirmed this long (Redis unreachable) is not routed to"}
    )
    recovery_window_s: float = field(
        default=5.0, metadata={"help": "after a Redis outage, keep workers missing from it this long"}
    )
    affinity_ttl_s: float = field(
        default=600.0, metadata={"help": "life of a session's affinity after its last request (0: no affinity)"}
    )
    affinity_max_waiting: int = field(
        default=2, metadata={"help": "a session's worker with more waiting requests loses the affinity"}
    )
    affinity_max_kv_usage: float = field(
        default=0.9, metadata={"help": "a session's worker with a fuller KV cache (0-1) loses the affinity"}
    )

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduler policy {self.policy!r}; valid: {', '.join(sorted(POLICIES))}")
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("local_prefill_max_tokens", self.local_prefill_max_tokens, minimum=0)
        _check_int("kv_events_block_ms", self.kv_events_block_ms, minimum=1)
        _check_float("queue_weight", self.queue_weight, positive=False)
        _check_float("kv_weight", self.kv_weight, positive=False)
        _check_float("refresh_interval_s", self.refresh_interval_s, positive=True)
        _check_float("speculative_ttl_s", self.speculative_ttl_s, positive=False)
        _check_float("stale_grace_s", self.stale_grace_s, positive=True)
        _check_float("recovery_window_s", self.recovery_window_s, positive=False)
        _check_float("affinity_ttl_s", self.affinity_ttl_s, positive=False)
        _check_int("affinity_max_waiting", self.affinity_max_waiting, minimum=0)
        _check_float("affinity_max_kv_usage", self.affinity_max_kv_usage, positive=False)
        if self.affinity_max_kv_usage > 1:
            raise ValueError(f"scheduler affinity_max_kv_usage must be <= 1, got {self.affinity_max_kv_usage!r}")


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"scheduler {name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: float, positive: bool) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"scheduler {name} must be a finite number {bound}, got {value!r}")
