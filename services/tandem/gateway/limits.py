"""Per-key rate limits shared by every gateway replica through Redis (DESIGN.md section 4).

Two token buckets per key id (from `tandem.gateway.auth`):
- `requests`: capacity `burst_requests`, refills at `requests_per_minute / 60` per second;
  each request costs 1.
- `tokens`: capacity `burst_tokens`, refills at `tokens_per_minute / 60` per second; a request
  costs `num_tokens` (what the caller charges, e.g. prompt tokens + max_tokens).

Keys, under `tandem:{cluster}:`: `ratelimit:{key_id}:requests` and `ratelimit:{key_id}:tokens`,
each a hash `level` (tokens in the bucket, a float) and `ts_us` (Redis time of `level`, in
microseconds). A missing key is a full bucket. Each write sets a TTL of the time to refill
the bucket from empty (+1 s), after which it would be full anyway, so expiry changes nothing.

Lifecycle of `RateLimiter.acquire(key_id, num_tokens)`, called by the gateway once per request
after authentication and tokenization, before any work is scheduled:
1. A disabled limiter (no limit configured) allows at once and never talks to Redis.
2. A request for more tokens than the tokens bucket can ever hold is refused without a Redis
   call: `RateDecision(False, math.inf, "tokens")`. `retry_after_s = inf` means "never as
   it is": the caller should answer 429 saying the request exceeds the per-minute token
   limit and omit the `Retry-After` header (or send none that promises success).
3. Otherwise one Lua script (atomic in Redis, clock = Redis `TIME`, so all replicas agree)
   refills every configured bucket up to now, then either charges all of them, or, if any
   would go below zero, charges none and returns the wait until every refused bucket holds
   enough (deficit / refill rate). `limit` names the refused bucket with the longest wait
   (the requests bucket on a tie).

Redis errors (connection, timeout) propagate as `redis.RedisError`. Recommendation for the
caller: fail open (serve the request, log a warning, count it) on a Redis error, since rate
limiting protects fairness, not safety, and the routing state lives in Redis anyway: if
Redis is gone the cluster is already degraded and refusing every request would turn a
partial outage into a total one. Deployments that sell quotas can choose fail closed (503).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import redis.asyncio

LIMIT_REQUESTS = "requests"
LIMIT_TOKENS = "tokens"
SECONDS_PER_MINUTE = 60.0
TTL_MARGIN_MS = 1000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")  # same rule as cluster_state: no glob chars

# KEYS: one bucket key per configured bucket.
# ARGV: per bucket, in KEYS order: capacity, refill rate (per second), cost, ttl (ms).
# Returns {allowed (1/0), refused bucket index (1-based, 0 if allowed), retry_after_s string}.
# Floats are returned as strings: Redis truncates Lua numbers to integers.
_ACQUIRE_LUA = """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local levels = {}
local worst, worst_wait = 0, 0
for i = 1, #KEYS do
  local capacity = tonumber(ARGV[4 * i - 3])
  local rate = tonumber(ARGV[4 * i - 2])
  local cost = tonumber(ARGV[4 * i - 1])
  local state = redis.call('HMGET', KEYS[i], 'level', 'ts_us')
  local level = capacity
  if state[1] and state[2] then
    local elapsed_s = math.max(0, now_us - tonumber(state[2])) / 1000000
    level = math.min(capacity, tonumber(state[1]) + elapsed_s * rate)
  end
  levels[i] = level - cost
  if levels[i] < 0 then
    local wait = (cost - level) / rate
    if wait > worst_wait then
      worst, worst_wait = i, wait
    end
  end
end
if worst > 0 then
  return {0, worst, string.format('%.6f', worst_wait)}
end
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'level', string.format('%.17g', levels[i]),
             'ts_us', string.format('%.0f', now_us))
  redis.call('PEXPIRE', KEYS[i], ARGV[4 * i])
end
return {1, 0, '0'}
"""


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an int >= 1 or None (no limit), got {value!r}")


@dataclass(frozen=True)
class RateLimitConfig:
    """Per-key limits; None means no limit. A burst defaults to its per-minute limit."""

    requests_per_minute: int | None = field(
        default=None, metadata={"flag": "rate-limit-rpm", "help": "requests per minute per API key"}
    )
    tokens_per_minute: int | None = field(
        default=None, metadata={"flag": "rate-limit-tpm", "help": "prompt + max tokens per minute per API key"}
    )
    burst_requests: int | None = field(
        default=None, metadata={"flag": "rate-limit-burst-requests", "help": "default: --rate-limit-rpm"}
    )
    burst_tokens: int | None = field(
        default=None, metadata={"flag": "rate-limit-burst-tokens", "help": "default: --rate-limit-tpm"}
    )

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "burst_requests", "burst_tokens"):
            _check_limit(name, getattr(self, name))
        if self.burst_requests is not None and self.requests_per_minute is None:
            raise ValueError("burst_requests needs requests_per_minute")
        if self.burst_tokens is not None and self.tokens_per_minute is None:
            raise ValueError("burst_tokens needs tokens_per_minute")

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    @property
    def request_capacity(self) -> int | None:
        return self.burst_requests if self.burst_requests is not None else self.requests_per_minute

    @property
    def token_capacity(self) -> int | None:
        return self.burst_tokens if self.burst_tokens is not None else self.tokens_per_minute


@dataclass(frozen=True)
class RateDecision:
    """`allowed`; otherwise the seconds until a retry can succeed (inf: never, see module
    docstring) and which bucket refused (`"requests"` or `"tokens"`; None when allowed)."""

    allowed: bool
    retry_after_s: float
    limit: str | None


ALLOWED = RateDecision(True, 0.0, None)


@dataclass(frozen=True)
class _Bucket:
    name: str  # LIMIT_REQUESTS or LIMIT_TOKENS: last part of the Redis key, and `limit`
    capacity: int
    rate_per_s: float

    @property
    def ttl_ms(self) -> int:
        return math.ceil(self.capacity / self.rate_per_s * 1000) + TTL_MARGIN_MS


class RateLimiter:
    """Token-bucket limits per key id, in Redis. Stateless apart from config: any number of
    instances (in one or many gateway processes) on the same Redis and cluster share buckets.

    `client` is owned by the caller; it may use `decode_responses` either way.
    """

    def __init__(self, client: redis.asyncio.Redis, cluster: str, config: RateLimitConfig) -> None:
        if not isinstance(cluster, str) or not _NAME_RE.match(cluster):
            raise ValueError(f"cluster must be 1-128 chars of [A-Za-z0-9_.-], got {cluster!r}")
        self._client = client
        self._prefix = f"tandem:{cluster}:ratelimit:"
        self._config = config
        buckets = []
        if config.requests_per_minute is not None and config.request_capacity is not None:
            rate = config.requests_per_minute / SECONDS_PER_MINUTE
            buckets.append(_Bucket(LIMIT_REQUESTS, config.request_capacity, rate))
        if config.tokens_per_minute is not None and config.token_capacity is not None:
            rate = config.tokens_per_minute / SECONDS_PER_MINUTE
            buckets.append(_Bucket(LIMIT_TOKENS, config.token_capacity, rate))
        self._buckets: tuple[_Bucket, ...] = tuple(buckets)
        # register_script sends nothing: the script is loaded on its first call (EVALSHA,
        # falling back to EVAL/SCRIPT LOAD after NOSCRIPT, e.g. after a Redis restart).
        self._script = client.register_script(_ACQUIRE_LUA) if buckets else None

    @property
    def config(self) -> RateLimitConfig:
        return self._config

    def key(self, key_id: str, limit: str) -> str:
        """Redis key of one bucket, e.g. `tandem:default:ratelimit:key-ab12:requests`."""
        return f"{self._prefix}{key_id}:{limit}"

    async def acquire(self, key_id: str, num_tokens: int) -> RateDecision:
        """Charge one request and `num_tokens` tokens to `key_id`, or charge nothing and refuse.

        Raises ValueError for a bad key id or token count, and `redis.RedisError` on Redis
        failures (nothing is charged when the script did not run).
        """
        if not isinstance(key_id, str) or not _NAME_RE.match(key_id):
            raise ValueError(f"key_id must be 1-128 chars of [A-Za-z0-9_.-], got {key_id!r}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if self._script is None:
            return ALLOWED
        costs = {LIMIT_REQUESTS: 1, LIMIT_TOKENS: num_tokens}
        for bucket in self._buckets:
            if costs[bucket.name] > bucket.capacity:
                return RateDecision(False, math.inf, bucket.name)
        keys = [self.key(key_id, bucket.name) for bucket in self._buckets]
        args: list[str | int] = []
        for bucket in self._buckets:
            args += [bucket.capacity, repr(bucket.rate_per_s), costs[bucket.name], bucket.ttl_ms]
        allowed, refused, retry_after = await self._script(keys=keys, args=args)
        if int(allowed):
            return ALLOWED
        name = self._buckets[int(refused) - 1].name
        text = retry_after.decode() if isinstance(retry_after, bytes) else str(retry_after)
        return RateDecision(False, float(text), name)
