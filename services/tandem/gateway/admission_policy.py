"""The admission decision of the gateway (pure): its config, the signals it reads, and the
bounds (issue 15, deliverable 2). admission.py gathers the signals and applies the decision.

Priorities (vLLM's `priority`: an integer, lower is more important; default 0, or the API
key's default from `key_priority`): a request of priority p may use the share
`share(p) = 1 - priority_step * p` of every bound (1 for p <= 0, never below 0), so under
overload the numerically larger priorities are refused first, and headroom stays for the
smaller ones. Whatever its priority, a request finds room when nothing is in flight and
nothing is queued (every count bound is at least 1).

The bounds (`decide`), in order:
- per key: `key_inflight < max_inflight_per_key` (if set) -> else 429;
- fixed: `own_inflight < max(1, floor(max_inflight * share))` (if set) -> else 503;
- adaptive: `own_inflight < max(1, floor(limit * share))`, where `limit` follows the measured
  TTFT and queue wait of the admitted requests (concurrency_limit.py; its target is
  `limit.ttft_target_s`, default half the TTFT budget) -> else 503. Each ticket's first token
  is a sample; a request still waiting past the target is a late sample at once, all of it
  queue wait (checked at each admission), so a stalled pool shrinks the limit without any
  first token;
- TTFT: with `queue` = waiting requests (max of ours not yet started and the pools' published
  `waiting`) and `tokens` = their prompt tokens (likewise with published queued prefill
  tokens), a request waits about `max((queue + 1) / start_rate, (tokens + its own) /
  token_rate)`; it is admitted when the queue is empty or that is within
  `ttft_budget_s * share`. Until a rate is measured, the queue may hold
  `cold_start_queue * share` requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tandem.gateway.auth import ANONYMOUS_KEY_ID, key_id_of
from tandem.gateway.concurrency_limit import LimitConfig

MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class AdmissionConfig:
    """Overload control of one gateway (see the module docstring). 0 disables a count bound."""

    ttft_budget_s: float = field(default=5.0, metadata={"help": "admit only what can start within this TTFT"})
    max_inflight: int = field(default=0, metadata={"help": "fixed bound on this gateway's requests (0: none)"})
    max_inflight_per_key: int = field(default=0, metadata={"help": "bound per API key, 429 above it (0: none)"})
    priority_step: float = field(
        default=0.25, metadata={"help": "share of every bound that each priority level above 0 gives up"}
    )
    key_priority: tuple[str, ...] = field(
        default=(), metadata={"help": "KEY=PRIORITY: an API key's default priority (repeatable)"}
    )
    drain_window_s: float = field(default=10.0, metadata={"help": "window of the measured drain rates"})
    cold_start_queue: int = field(default=64, metadata={"help": "requests queued before a drain rate is known"})
    limit: LimitConfig = field(default_factory=LimitConfig)

    def __post_init__(self) -> None:
        for name in ("ttft_budget_s", "drain_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_inflight", "max_inflight_per_key"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no bound), got {getattr(self, name)}")
        if self.cold_start_queue < 1:
            raise ValueError(f"cold_start_queue must be >= 1, got {self.cold_start_queue}")
        if not 0 <= self.priority_step <= 1:
            raise ValueError(f"priority_step must be in [0, 1], got {self.priority_step}")
        if self.ttft_target_s() > self.ttft_budget_s:
            raise ValueError(
                f"ttft_target_s ({self.ttft_target_s()}) must be <= ttft_budget_s ({self.ttft_budget_s}): "
                "the adaptive limit's target is within the budget admission promises"
            )
        self.key_priorities()  # validates the entries

    def ttft_target_s(self) -> float:
        """The adaptive limit's TTFT target: `limit.ttft_target_s`, else half the budget."""
        return self.limit.ttft_target_s if self.limit.ttft_target_s is not None else self.ttft_budget_s / 2

    def key_priorities(self) -> dict[str, int]:
        """Key id (auth.py) -> default priority, from the `KEY=PRIORITY` entries."""
        out: dict[str, int] = {}
        for entry in self.key_priority:
            key, sep, value = entry.rpartition("=")
            try:
                priority = int(value)
            except ValueError:
                priority = None
            if not sep or not key or priority is None:
                raise ValueError(f"key_priority entries are KEY=PRIORITY with an integer priority, got {entry!r}")
            out[ANONYMOUS_KEY_ID if key == ANONYMOUS_KEY_ID else key_id_of(key)] = priority
        return out

    def share(self, priority: int) -> float:
        """The share of every bound a request of `priority` may use."""
        return 1.0 if priority <= 0 else max(0.0, 1.0 - self.priority_step * priority)


@dataclass(frozen=True)
class AdmissionSignals:
    """What one decision reads. Counts are this gateway's own unless named `published_`;
    rates are None until measured (`throughput.RateMeter`)."""

    own_inflight: int
    own_waiting: int  # admitted, no first token yet
    own_waiting_tokens: int
    key_inflight: int
    published_waiting: int
    published_queued_tokens: int
    start_rate_rps: float | None
    token_rate_tps: float | None
    finish_rate_rps: float | None
    limit: int | None = None  # the adaptive limit; None when it is off


@dataclass(frozen=True)
class Admission:
    """`status` is 0 when admitted, else 429 or 503 with `retry_after_s` and a `message`."""

    status: int
    retry_after_s: float = 0.0
    message: str = ""
    reason: str = ""  # "key", "inflight", "limit" or "ttft"

    @property
    def admitted(self) -> bool:
        return self.status == 0


ADMITTED = Admission(0)


def decide(s: AdmissionSignals, priority: int, num_prompt_tokens: int, config: AdmissionConfig) -> Admission:
    """The admission of one request (pure; see the module docstring for the bounds)."""
    share = config.share(priority)
    if config.max_inflight_per_key and s.key_inflight >= config.max_inflight_per_key:
        excess = s.key_inflight - config.max_inflight_per_key + 1
        key_rate = None if s.finish_rate_rps is None else s.finish_rate_rps * s.key_inflight / max(1, s.own_inflight)
        return Admission(
            429,
            _drain_s(excess, key_rate),
            f"Too many concurrent requests for this API key: the limit is {config.max_inflight_per_key}.",
            "key",
        )
    if config.max_inflight:
        cap = max(1, math.floor(config.max_inflight * share))
        if s.own_inflight >= cap:
            return Admission(
                503,
                _drain_s(s.own_inflight - cap + 1, s.finish_rate_rps),
                f"The server is overloaded: {s.own_inflight} requests in flight, and priority {priority} "
                f"is admitted below {cap}.",
                "inflight",
            )
    if s.limit is not None:
        cap = max(1, math.floor(s.limit * share))
        if s.own_inflight >= cap:
            return Admission(
                503,
                _drain_s(s.own_inflight - cap + 1, s.finish_rate_rps),
                f"The server is overloaded: {s.own_inflight} requests in flight, and priority {priority} "
                f"is admitted below {cap} (the limit measured to keep the first token within "
                f"{config.ttft_target_s():.2f} s).",
                "limit",
            )
    queue = max(s.own_waiting, s.published_waiting)
    if queue == 0:
        return ADMITTED
    budget_s = config.ttft_budget_s * share
    if s.start_rate_rps is None:
        cold_cap = max(1, math.floor(config.cold_start_queue * share))
        if queue < cold_cap:
            return ADMITTED
        return Admission(
            503,
            MIN_RETRY_AFTER_S,
            f"The server is overloaded: {queue} requests are waiting to start.",
            "ttft",
        )
    wait_s = (queue + 1) / s.start_rate_rps
    if s.token_rate_tps:
        tokens = max(s.own_waiting_tokens, s.published_queued_tokens)
        wait_s = max(wait_s, (tokens + num_prompt_tokens) / s.token_rate_tps)
    if wait_s <= budget_s:
        return ADMITTED
    return Admission(
        503,
        _clamp(wait_s - budget_s),
        f"The server is overloaded: a new request would wait about {wait_s:.1f} s for its first token, "
        f"over the {budget_s:.1f} s that priority {priority} is given.",
        "ttft",
    )


def _drain_s(excess: int, rate_rps: float | None) -> float:
    """Seconds until `excess` requests finished at the measured rate (1 s while unmeasured)."""
    return MIN_RETRY_AFTER_S if not rate_rps else _clamp(excess / rate_rps)


def _clamp(seconds: float) -> float:
    return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, seconds))
