"""The autoscaler's configuration: per-pool bounds and targets, loop timing, P:D ratio bounds.

Frozen and validated once (`__post_init__` raises ValueError with a message naming the field
and the accepted range). The flags of `tandem autoscaler` and `tandem up --autoscale` are
generated from these fields (`tandem.common.options`). Nothing patches it later.

This module imports nothing but the standard library: the CLI reads it when it builds its parser.

Units: every duration is in seconds (`_s`); `target_kv_usage` and `tolerance` are fractions in
[0, 1]; the ratio bounds are prefill replicas per decode replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, minimum: float, *, strict: bool = False, allow_inf: bool = False) -> None:
    """`value` is a real number >= minimum (> minimum if strict), finite unless allow_inf."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and not math.isnan(value)
        and (allow_inf or math.isfinite(value))
        and (value > minimum if strict else value >= minimum)
    )
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {kind} {bound}, got {value!r}")


@dataclass(frozen=True)
class PoolPolicy:
    """Replica bounds of one pool. The policy never asks for fewer than `min_replicas` nor
    more than `max_replicas`, whatever the signals say (or fail to say)."""

    min_replicas: int = field(default=1, metadata={"flag": "min", "help": "fewest replicas of the pool"})
    max_replicas: int = field(default=4, metadata={"flag": "max", "help": "most replicas of the pool"})

    def __post_init__(self) -> None:
        _check_int("min_replicas", self.min_replicas, 0)
        _check_int("max_replicas", self.max_replicas, 1)
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")

    def clamp(self, replicas: int) -> int:
        """`replicas` brought into [min_replicas, max_replicas]."""
        return min(self.max_replicas, max(self.min_replicas, replicas))


@dataclass(frozen=True)
class PrefillPolicy(PoolPolicy):
    """The prefill pool: sized so that each replica has about `target_queued_tokens_per_replica`
    prompt tokens queued. `min_replicas` may be 0 (decode workers then prefill locally)."""

    target_queued_tokens_per_replica: int = field(
        default=2048, metadata={"flag": "target-queued-tokens", "help": "queued prefill tokens per prefill replica"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("target_queued_tokens_per_replica", self.target_queued_tokens_per_replica, 1)


@dataclass(frozen=True)
class DecodePolicy(PoolPolicy):
    """The decode pool: sized for both about `target_waiting_per_replica` waiting requests per
    replica and a KV cache use of about `target_kv_usage` (the larger of the two wins).
    `min_replicas` is at least 1: decode workers are the only ones that stream tokens."""

    target_waiting_per_replica: float = field(
        default=4.0, metadata={"flag": "target-waiting", "help": "waiting requests per decode replica"}
    )
    target_kv_usage: float = field(default=0.8, metadata={"help": "KV cache use of the decode pool, 0 to 1"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_replicas < 1:
            raise ValueError(
                f"decode min_replicas must be >= 1 (no decode worker means no completions), got {self.min_replicas}"
            )
        _check_number("target_waiting_per_replica", self.target_waiting_per_replica, 0.0, strict=True)
        _check_number("target_kv_usage", self.target_kv_usage, 0.0, strict=True)
        if self.target_kv_usage > 1.0:
            raise ValueError(f"target_kv_usage is a fraction in (0, 1], got {self.target_kv_usage!r}")


@dataclass(frozen=True)
class AutoscalerConfig:
    """Everything the policy and the loop need. Defaults follow the Kubernetes HPA where it has
    an equivalent (15 s sync period, 300 s scale-down stabilisation window, 10 % tolerance).

    - `interval_s`: time between two steps of the loop.
    - `stabilisation_window_s`: a pool only shrinks to the highest recommendation of this window.
    - `up_cooldown_s` / `down_cooldown_s`: no scale-up / scale-down of a pool within this long of
      its last change (lets new replicas start, and finish draining, before the next move).
    - `max_signal_age_s`: a worker's load older than this makes its pool's signals stale.
    - `min_prefill_per_decode` / `max_prefill_per_decode`: bounds on desired prefill / desired
      decode replicas. 0 and infinity (the defaults) mean no bound.
    - `tolerance`: no change while the load-to-target ratio is within 1 ± tolerance.
    - `planned_prefill_per_decode`: a planned P:D ratio (None: no plan). Both pools then grow
      together to keep about this many prefill replicas per decode replica (see policy.py).
    """

    prefill: PrefillPolicy = field(default_factory=PrefillPolicy, metadata={"prefix": "prefill-"})
    decode: DecodePolicy = field(default_factory=DecodePolicy, metadata={"prefix": "decode-"})
    interval_s: float = field(default=15.0, metadata={"help": "time between two steps of the loop"})
    stabilisation_window_s: float = field(
        default=300.0, metadata={"help": "a pool only shrinks to the highest recommendation of this window"}
    )
    up_cooldown_s: float = field(default=30.0, metadata={"help": "no scale-up of a pool this soon after a change"})
    down_cooldown_s: float = field(default=60.0, metadata={"help": "no scale-down of a pool this soon after a change"})
    max_signal_age_s: float = field(default=15.0, metadata={"help": "older worker loads make signals stale"})
    min_prefill_per_decode: float = field(
        default=0.0, metadata={"help": "lower bound on prefill / decode replicas (0: none)"}
    )
    max_prefill_per_decode: float = field(
        default=math.inf, metadata={"help": "upper bound on prefill / decode replicas (inf: none)"}
    )
    tolerance: float = field(default=0.1, metadata={"help": "no change while load / target is within 1 +- tolerance"})
    planned_prefill_per_decode: float | None = field(
        default=None,
        metadata={"help": "planned prefill / decode replicas (e.g. from `tandem plan`): both pools follow it"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.prefill, PrefillPolicy):
            raise ValueError(f"prefill must be a PrefillPolicy, got {self.prefill!r}")
        if not isinstance(self.decode, DecodePolicy):
            raise ValueError(f"decode must be a DecodePolicy, got {self.decode!r}")
        _check_number("interval_s", self.interval_s, 0.0, strict=True)
        _check_number("max_signal_age_s", self.max_signal_age_s, 0.0, strict=True)
        for name in ("stabilisation_window_s", "up_cooldown_s", "down_cooldown_s"):
            _check_number(name, getattr(self, name), 0.0)
        _check_number("min_prefill_per_decode", self.min_prefill_per_decode, 0.0)
        _check_number("max_prefill_per_decode", self.max_prefill_per_decode, 0.0, strict=True, allow_inf=True)
        if self.min_prefill_per_decode > self.max_prefill_per_decode:
            raise ValueError(
                f"min_prefill_per_decode ({self.min_prefill_per_decode}) must be <= "
                f"max_prefill_per_decode ({self.max_prefill_per_decode})"
            )
        _check_number("tolerance", self.tolerance, 0.0)
        if self.tolerance >= 1.0:
            raise ValueError(f"tolerance is a fraction in [0, 1), got {self.tolerance!r}")
        self._check_ratio_reachable()
        self._check_plan()

    def _check_plan(self) -> None:
        """A planned ratio is a positive number within the ratio bounds."""
        plan = self.planned_prefill_per_decode
        if plan is None:
            return
        _check_number("planned_prefill_per_decode", plan, 0.0, strict=True)
        if not self.min_prefill_per_decode <= plan <= self.max_prefill_per_decode:
            raise ValueError(
                f"planned_prefill_per_decode ({plan}) must be within [min_prefill_per_decode, "
                f"max_prefill_per_decode] = [{self.min_prefill_per_decode}, {self.max_prefill_per_decode}]"
            )

    def _check_ratio_reachable(self) -> None:
        """The replica bounds must leave room for the ratio bounds, or no count could satisfy them."""
        if self.prefill.min_replicas > self.max_prefill_per_decode * self.decode.max_replicas:
            raise ValueError(
                f"prefill min_replicas ({self.prefill.min_replicas}) exceeds max_prefill_per_decode "
                f"({self.max_prefill_per_decode}) x decode max_replicas ({self.decode.max_replicas}); "
                f"raise the ratio or decode max_replicas, or lower prefill min_replicas"
            )
        if self.min_prefill_per_decode * self.decode.min_replicas > self.prefill.max_replicas:
            raise ValueError(
                f"min_prefill_per_decode ({self.min_prefill_per_decode}) x decode min_replicas "
                f"({self.decode.min_replicas}) exceeds prefill max_replicas ({self.prefill.max_replicas}); "
                f"lower the ratio or decode min_replicas, or raise prefill max_replicas"
            )


# The actuators `tandem autoscaler` can run as a service. `local` and `ray` act on a cluster
# that `tandem up` owns, from inside that process, so they are not service choices.
SERVICE_ACTUATORS = ("kubernetes",)


@dataclass(frozen=True)
class KubernetesTarget:
    """The Deployments the `kubernetes` actuator scales (one per pool, in one namespace)."""

    namespace: str | None = field(
        default=None,
        metadata={"help": "namespace of the Deployments (default: the pod's own, from its service account)"},
    )
    kubeconfig: Path | None = field(default=None, metadata={"help": "kubeconfig file (default: in-cluster config)"})
    prefill_deployment: str = field(default="tandem-prefill", metadata={"help": "the prefill pool's Deployment"})
    decode_deployment: str = field(default="tandem-decode", metadata={"help": "the decode pool's Deployment"})

    def __post_init__(self) -> None:
        for name in ("prefill_deployment", "decode_deployment"):
            if not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty Deployment name")


@dataclass(frozen=True)
class AutoscalerServiceConfig:
    """`tandem autoscaler`: the policy plus where it reads signals, what it scales, and where it
    serves its metrics. Its flags are generated from these fields."""

    redis_url: str = field(metadata={"flag": "redis", "help": "Redis URL of the cluster state"})
    cluster: str = field(default="default", metadata={"help": "cluster name (the Redis key prefix)"})
    actuator: str = field(
        default="kubernetes", metadata={"choices": SERVICE_ACTUATORS, "help": "what scales the pools"}
    )
    kubernetes: KubernetesTarget = field(default_factory=KubernetesTarget)
    policy: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    host: str = field(default="127.0.0.1", metadata={"help": "bind address of the metrics server"})
    metrics_port: int = field(default=9400, metadata={"help": "serve Prometheus /metrics here (0: a free port)"})

    def __post_init__(self) -> None:
        if not self.redis_url:
            raise ValueError("redis_url must be a Redis URL, e.g. redis://redis:6379/0")
        if self.actuator not in SERVICE_ACTUATORS:
            raise ValueError(f"actuator must be one of {SERVICE_ACTUATORS}, got {self.actuator!r}")
        _check_int("metrics_port", self.metrics_port, 0)
        if self.metrics_port > 65535:
            raise ValueError(f"metrics_port must be <= 65535, got {self.metrics_port}")
