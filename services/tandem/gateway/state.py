"""Everything one gateway process holds, and the request checks that need it.

Built once from a `GatewayConfig`; `lifespan` starts the scheduler (registry refresher and
KV-event follower threads), the Redis client of the rate limiter, and a task that closes the
channels of departed workers; it stops them all at shutdown. Handlers only read this state.

Redis outages: routing goes on from the scheduler's last view (see `tandem.scheduler`), and
the rate limiter fails open (limits.py says why): a request is let through unchecked, counted
in `tandem_rate_limit_fail_open_total`, and the outage is logged once when it begins and once
when it ends. After a failed call the limiter skips Redis for `LIMITER_RETRY_S`, so that no
request waits for a timeout meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff

from tandem.common.cluster_state import CLIENT_RETRY_BACKOFF_S, ClusterState, connect
from tandem.common.outage import Outage
from tandem.common.tracing import Tracing
from tandem.common.workers import WorkerRole
from tandem.engine.model_config import ModelConfig
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.admission import AdmissionController, PoolLoad
from tandem.gateway.auth import APIKeys, AuthError, AuthFailure
from tandem.gateway.clients import WorkerClients
from tandem.gateway.config import GatewayConfig
from tandem.gateway.errors import OpenAIError, invalid_api_key, missing_api_key, rate_limited
from tandem.gateway.guardrails import load_guardrails
from tandem.gateway.limits import RateLimiter
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.pipeline import Pipeline
from tandem.gateway.protocol import ServedModel
from tandem.scheduler import Scheduler
from tandem.scheduler.affinity import AffinityStore, session_hash
from tandem.scheduler.gateway_report import default_gateway_id

log = logging.getLogger(__name__)
_PRUNE_INTERVAL_S = 5.0
REDIS_TIMEOUT_S = 1.0  # a call to an unreachable Redis fails within about twice this
LIMITER_RETRY_S = 1.0  # after a failed limiter call, fail open without calling Redis this long


class GatewayState:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        model_config = ModelConfig.from_dir(config.model_dir)
        limit = model_config.max_model_len
        self.served = ServedModel(
            name=config.model_name,
            tokenizer=Tokenizer.from_pretrained(config.model_dir),
            vocab_size=model_config.vocab_size,
            max_model_len=min(config.max_model_len or limit, limit),
            max_n=config.max_n,
            tool_call_parser=config.tool_call_parser,
        )
        self.created = int(time.time())
        self.metrics = GatewayMetrics(config.model_name)
        self.tracing = Tracing.create(config.tracing, "tandem-gateway")
        self.tracer = self.tracing.tracer
        self.auth = APIKeys(config.api_keys)
        self._redis = connect(config.redis_url, REDIS_TIMEOUT_S)
        # The KV-event follower blocks in XREAD for up to kv_events_block_ms: its own client.
        events_timeout_s = config.scheduler.kv_events_block_ms / 1000 + 5.0
        self._events_redis = connect(config.redis_url, events_timeout_s)
        self.scheduler = Scheduler(
            ClusterState(self._redis, config.cluster),
            config.scheduler,
            events_state=ClusterState(self._events_redis, config.cluster),
            model_id=config.hash_model_id,
            gateway_id=default_gateway_id(),
        )
        self.clients = WorkerClients(config.plane.token)
        guardrails = load_guardrails(config.guardrails, config.guardrail_window_chars)
        self.guardrails = guardrails.counted(self.metrics.guardrail_action)
        # Session affinity: its own async client, built here (it connects on first use, on the loop).
        self._affinity_redis: aioredis.Redis | None = None
        affinity: AffinityStore | None = None
        if config.session_key != "none" and config.scheduler.affinity_ttl_s > 0:
            self._affinity_redis = aioredis.Redis.from_url(
                config.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
            affinity = AffinityStore(
                self._affinity_redis, config.cluster, config.scheduler.affinity_ttl_s, REDIS_TIMEOUT_S
            )
        self.pipeline = Pipeline(config, self.scheduler, self.clients, self.metrics, self.tracer, affinity)
        self.admission = AdmissionController(config.admission, self.metrics, self.pool_load)
        self._aioredis: aioredis.Redis | None = None
        self.limiter: RateLimiter | None = None
        self._limiter_outage = Outage("rate limiter", log)
        self._limiter_skip_until_s = 0.0  # monotonic; fail open without calling Redis until then

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self._aioredis = aioredis.Redis.from_url(
            self.config.redis_url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(ConstantBackoff(CLIENT_RETRY_BACKOFF_S), 1),
        )
        self.limiter = RateLimiter(self._aioredis, self.config.cluster, self.config.rate_limits)
        self.scheduler.start()
        pruner = asyncio.create_task(self._prune_loop())
        try:
            yield
        finally:
            pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruner
            self.scheduler.stop()
            await self.clients.close()
            await self._aioredis.aclose()
            if self._affinity_redis is not None:
                await self._affinity_redis.aclose()
            self._redis.close()
            self._events_redis.close()
            self.tracing.shutdown()

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(_PRUNE_INTERVAL_S)
            await self.clients.prune(v.info.address for v in self.scheduler.workers())

    def update_pool_gauges(self) -> None:
        """Queue depth and worker count per pool from the current registry snapshot, and the
        routing mode (called on each /metrics scrape, so the gauges are never older than one
        refresh)."""
        views = self.scheduler.workers()
        waiting = {role: 0 for role in WorkerRole}
        count = {role: 0 for role in WorkerRole}
        for v in views:
            count[v.info.role] += 1
            waiting[v.info.role] += v.load.waiting if v.load is not None else 0
        self.metrics.set_pools(
            waiting[WorkerRole.PREFILL], waiting[WorkerRole.DECODE], count[WorkerRole.PREFILL], count[WorkerRole.DECODE]
        )
        self.metrics.set_routing_mode(self.scheduler.routing_mode())

    def pool_load(self) -> PoolLoad:
        """Waiting requests and queued prefill tokens of every live worker, as last published."""
        waiting = tokens = 0
        for v in self.scheduler.workers():
            if v.load is not None:
                waiting += v.load.waiting
                tokens += v.load.queued_prefill_tokens
        return PoolLoad(waiting, tokens)

    # ---- checks used by the handlers ---------------------------------------------------------
    def session(self, request: Request, user: str | None) -> str | None:
        """The hash of the request's session key (`--session-key`): None without one, or
        without session affinity."""
        if self.pipeline.affinity is None:
            return None
        key = request.headers.get(self.config.session_header) if self.config.session_key == "header" else user
        return session_hash(key) if key else None

    def authenticate(self, request: Request) -> str:
        try:
            return self.auth.check(request.headers.get("authorization"))
        except AuthError as exc:
            raise (missing_api_key() if exc.reason is AuthFailure.MISSING else invalid_api_key()) from None

    async def charge(self, key_id: str, num_tokens: int) -> None:
        """Charge the key's rate limits (429 with Retry-After when over). If Redis cannot be
        reached the request is let through (fail open, counted; see the module doc): a limiter
        outage must not take the whole API down."""
        if self.limiter is None or not self.limiter.config.enabled:
            return
        if time.monotonic() < self._limiter_skip_until_s:
            self.metrics.rate_limit_fail_open()
            return
        try:
            decision = await self.limiter.acquire(key_id, num_tokens)
        except (redis.RedisError, OSError) as exc:
            self._limiter_skip_until_s = time.monotonic() + LIMITER_RETRY_S
            self._limiter_outage.failed(exc, "letting requests through unchecked (fail open)")
            self.metrics.rate_limit_fail_open()
            return
        self._limiter_outage.ok()
        if decision.allowed:
            return
        config = self.config.rate_limits
        if math.isinf(decision.retry_after_s):  # more than the bucket can ever hold
            raise OpenAIError(
                429,
                f"Request too large: it needs {num_tokens} tokens, and the limit is "
                f"{config.token_capacity} tokens per minute.",
                "rate_limit_exceeded",
                None,
                "rate_limit_exceeded",
            )
        per_minute = config.requests_per_minute if decision.limit == "requests" else config.tokens_per_minute
        raise rate_limited(
            f"Rate limit reached for {decision.limit} per minute: limit {per_minute}. "
            f"Please try again in {decision.retry_after_s:.1f}s.",
            decision.retry_after_s,
        )


__all__ = ["GatewayState", "OpenAIError"]
