"""The request pipeline: route, prefill, stream the first token, then stream the decode.

One `Pipeline.generate(request)` call serves one choice of one client request
(DESIGN.md section 2, steps 2 to 7):

1. The prompt's block hashes are computed with the workers' function and the scheduler picks
   (P, D), or D alone when the uncached part is short or no prefill worker is live.
2. Disaggregated: `P.Prefill` runs the prompt and returns the first token and a KV handle. The
   first token is yielded at once; the transfer is not on the TTFT path. If the call fails
   before the first token (worker gone, busy, timed out, step failed), the request is routed
   again without P and retried once, on another prefill worker or locally on a decoder.
3. D decodes (request, first token, handle): it pulls the missing blocks and streams the rest.
   The request goes on this gateway's multiplexed decode stream to D (gateway/mux.py), with
   what a `Decode` call would carry, and its outputs come back demultiplexed; a request whose
   consumer stops reading overflows its buffer and is aborted on D (an error for its client;
   never migrated). A decoder that refuses before sending anything (gone or busy) is replaced
   once by another. Without a handle, D prefills locally.
4. A decode stream that fails after tokens were sent (the worker died, stalled past the idle
   timeout, or ended it at its drain deadline) is resumed on another decode worker with a
   replay of the prompt plus the tokens sent (migration.py), up to `max_migrations` times:
   the caller sees one unbroken stream.
5. Whoever stops consuming (client disconnect, a stop string, an error) closes the generator:
   the decode stream is cancelled, so D aborts the sequence within one step, and when a
   handle was taken P is told to drop its lease (ReleaseKV with the handle's lease secret).
   Nothing waits without a bound: each decode message has an idle timeout, each Prefill a
   deadline.
6. Session affinity (scheduler/affinity.py): a choice whose request carries a session key
   reads the session's decode worker from Redis once per route of the choice (bounded; a miss
   on error) and routes with it; every decision then records its decode worker for the
   session in the background, refreshing the affinity's TTL.
7. Each route's Prefill and Decode calls carry a fresh owner secret (`x-tandem-owner`,
   services/tandem/common/ownership.py): no other caller can Abort them on the workers.

Errors before the first yielded token are `OpenAIError`s (503 with Retry-After when no worker
can take the request); after it, `StreamError` (the caller turns it into an SSE error event).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from tandem.common import codec, kv_codec, mux_codec
from tandem.common.block_hash import block_extra, hash_blocks
from tandem.common.kv_handle import KVHandle
from tandem.common.ownership import OWNER_METADATA_KEY, new_owner_secret, owner_from_metadata, owner_metadata
from tandem.common.request import FinishReason, PromptLogprobs, Request, TokenLogprob
from tandem.common.tracing import inject_metadata
from tandem.common.workers import WorkerInfo
from tandem.gateway.clients import WorkerClients
from tandem.gateway.config import GatewayConfig
from tandem.gateway.errors import OpenAIError, bad_request, service_unavailable
from tandem.gateway.metrics import GatewayMetrics, MigrationReason
from tandem.gateway.migration import WORKER_FAILURES, DecodeFailure, Resume, StreamError, failure_reason, resumable
from tandem.gateway.mux import BufferOverflow
from tandem.gateway.tickets import RouteTickets
from tandem.scheduler import NoWorkerError, RouteDecision, RouteKind, RouteRequest, Scheduler
from tandem.scheduler.affinity import AffinityStore

log = logging.getLogger(__name__)

_ABORT_TIMEOUT_S = 2.0
__all__ = ["Delta", "Pipeline", "StreamError"]


@dataclass(frozen=True)
class Delta:
    """New tokens of one choice, in order. `finish_reason` is set on the last one."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason | None
    cached_tokens: int = 0  # first delta only: prompt tokens served from a prefix cache
    prompt_logprobs: PromptLogprobs | None = None  # first delta only, when asked for
    queue_s: float | None = None  # first delta only: its wait in a worker's queue (as reported)


class Pipeline:
    """Owned by the gateway app; one instance serves every request on the asyncio loop."""

    def __init__(
        self,
        config: GatewayConfig,
        scheduler: Scheduler,
        clients: WorkerClients,
        metrics: GatewayMetrics,
        tracer: trace.Tracer,
        affinity: AffinityStore | None = None,
    ) -> None:
        """`affinity` stores the sessions' decode workers (None: no session affinity)."""
        self.config = config
        self.affinity = affinity
        self.scheduler = scheduler
        self.clients = clients
        self.metrics = metrics
        self.tracer = tracer
        self._background: set[asyncio.Task] = set()

    def route(self, request: Request, tickets: RouteTickets, exclude: frozenset[str] = frozenset()) -> RouteDecision:
        route_request = RouteRequest(
            request.request_id,
            len(request.prompt_token_ids),
            tickets.block_hashes,
            self.scheduler.next_seq(),
            tickets.session_worker,
        )
        try:
            decision = self.scheduler.route(route_request, exclude)
        except NoWorkerError as exc:
            raise service_unavailable(f"no worker can take the request: {exc}", self.config.retry_after_s) from exc
        self.metrics.routed(decision.kind.value, self.config.scheduler.policy)
        tickets.add(decision)
        if tickets.session is not None and self.affinity is not None:
            self._background_task(self.affinity.remember(tickets.session, decision.decode.worker_id))
        return decision

    def generate(
        self, request: Request, parent: Context | None = None, session: str | None = None
    ) -> AsyncGenerator[Delta, None]:
        """The choice's deltas, resumed on another decode worker when its stream fails.
        `session`: the hash of the request's session key (None: no session affinity)."""
        resume = Resume(request, self.config.max_migrations)
        return resumable(lambda replay: self._attempt(replay, parent, resume, session), resume, self.metrics)

    async def _attempt(
        self, request: Request, parent: Context | None, resume: Resume, session: str | None
    ) -> AsyncIterator[Delta]:
        """One route of the choice: the client's request, or a migration's replay."""
        extra = block_extra(self.config.hash_model_id, request.cache_salt)
        hashes = tuple(hash_blocks(request.prompt_token_ids, self.config.scheduler.block_size, extra))
        if session is None or self.affinity is None:
            tickets = RouteTickets(self.scheduler, len(request.prompt_token_ids), hashes)
        else:
            worker = await self.affinity.worker_of(session)
            tickets = RouteTickets(self.scheduler, len(request.prompt_token_ids), hashes, session, worker)
        try:
            async for delta in self._generate(request, parent, tickets, resume):
                yield delta
        finally:
            tickets.close()

    async def _generate(
        self, request: Request, parent: Context | None, tickets: RouteTickets, resume: Resume
    ) -> AsyncIterator[Delta]:
        with self.tracer.start_as_current_span("route", context=parent) as span:
            t0 = time.perf_counter()
            decision = self.route(request, tickets, resume.exclude)
            self.metrics.observe_stage("route", time.perf_counter() - t0)
            span.set_attribute("tandem.route.kind", decision.kind.value)
            span.set_attribute("tandem.route.decode", decision.decode.worker_id)
            if decision.prefill is not None:
                span.set_attribute("tandem.route.prefill", decision.prefill.worker_id)
        metadata = (*inject_metadata(parent), owner_metadata(new_owner_secret()))
        first: codec.PrefillResult | None = None
        prefill_worker: WorkerInfo | None = None
        if decision.kind is RouteKind.DISAGGREGATED:
            first, decision = await self._prefill_with_retry(request, decision, metadata, tickets, resume.exclude)
            prefill_worker = decision.prefill
        completed = False
        try:  # from the first yield on: a client that leaves at any yield leaves no lease behind
            if first is not None:
                cached = first.num_cached_tokens
                lp = (first.first_logprob,) if first.first_logprob is not None else ()
                finish = first.finish_reason
                self.metrics.prefix(len(request.prompt_token_ids), cached)
                tokens = () if first.first_token is None else (first.first_token,)  # none: max_tokens 0
                yield Delta(tokens, lp, finish, cached, first.prompt_logprobs, first.queue_s)
                if finish is not None:
                    return  # no handle, no lease
            async for delta in self._decode(request, decision, first, metadata, tickets, resume):
                yield delta
            completed = True
        finally:
            if first is not None and first.handle is not None and prefill_worker is not None and not completed:
                self._release_soon(prefill_worker, first.handle, metadata)

    async def _prefill_with_retry(
        self,
        request: Request,
        decision: RouteDecision,
        metadata: tuple[tuple[str, str], ...],
        tickets: RouteTickets,
        exclude: frozenset[str],
    ) -> tuple[codec.PrefillResult | None, RouteDecision]:
        """The first token and handle from a prefill worker, retrying once elsewhere. Returns
        (None, local decision) when the retry routes the prompt to a decoder."""
        assert decision.prefill is not None
        try:
            return await self._prefill(decision.prefill.address, request, metadata), decision
        except grpc.aio.AioRpcError as exc:
            tickets.abandon(decision)
            if exc.code() not in WORKER_FAILURES:
                raise _rpc_error("prefill", exc, self.config.retry_after_s) from exc
            log.warning(
                "prefill of %s on %s failed (%s); retrying once",
                request.request_id,
                decision.prefill.worker_id,
                exc.code().name,
            )
            self.metrics.prefill_retry()
            first_error = exc
        retry = self.route(request, tickets, exclude | {decision.prefill.worker_id})
        if retry.kind is RouteKind.LOCAL_PREFILL:
            return None, retry
        assert retry.prefill is not None
        try:
            return await self._prefill(retry.prefill.address, request, metadata), retry
        except grpc.aio.AioRpcError as exc:
            tickets.abandon(retry)
            raise _rpc_error("prefill (after a retry)", exc, self.config.retry_after_s) from first_error

    async def _prefill(
        self, address: str, request: Request, metadata: tuple[tuple[str, str], ...]
    ) -> codec.PrefillResult:
        call = self.clients.stub(address).Prefill(
            codec.prefill_request_to_proto(request),
            timeout=self.config.prefill_timeout_s,
            metadata=metadata,
        )
        try:
            response = codec.prefill_result_from_proto(await call)
        except asyncio.CancelledError:
            call.cancel()  # P aborts the sequence and drops any lease
            raise
        self._observe_stage("prefill_queue", response.queue_s)
        self._observe_stage("prefill_compute", response.compute_s)
        return response

    async def _decode(
        self,
        request: Request,
        decision: RouteDecision,
        first: codec.PrefillResult | None,
        metadata: tuple[tuple[str, str], ...],
        tickets: RouteTickets,
        resume: Resume,
    ) -> AsyncIterator[Delta]:
        """The decode stream; a failure raises `DecodeFailure` (or, for a local prefill of the
        client's own request that fails before any output, the `OpenAIError` of the call)."""
        call = (
            codec.DecodeRequest(request)
            if first is None
            else codec.DecodeRequest(request, first.first_token, first.handle)
        )
        if first is not None:
            tickets.prefill_done()  # the prompt ran on P; a local prefill ends with the first delta
        decode = decision.decode
        owner = owner_from_metadata(metadata)
        trace = tuple(item for item in metadata if item[0] != OWNER_METADATA_KEY)
        submit = mux_codec.MuxSubmit(call, owner, trace)
        for attempt in (0, 1):
            received = False
            # twice the slow-client bound: a client that stops reading is aborted by that bound (a
            # 408, in Generation) before this buffer gives up, which it only does as a safety net
            conn = self.clients.decode_stream(
                decode.address, self.config.max_buffered_events, 2 * self.config.slow_client_timeout_s
            )
            submitted_s = time.monotonic()  # a local prefill's prefill_compute stage starts here
            stream = conn.submit(submit)
            try:
                while True:
                    try:
                        msg = await stream.get(self.config.decode_idle_timeout_s)
                    except asyncio.TimeoutError:
                        raise DecodeFailure(
                            f"decode worker {decode.worker_id} sent nothing for {self.config.decode_idle_timeout_s} s",
                            decode.worker_id,
                            MigrationReason.STALLED,
                        ) from None
                    except BufferOverflow as exc:
                        raise DecodeFailure(str(exc), decode.worker_id, None) from None
                    if not received and first is None:
                        self._observe_stage("prefill_compute", max(0.0, time.monotonic() - submitted_s - msg.admit_s))
                    delta = self._delta(msg, not received, first is None, request, decode)
                    if not received:
                        tickets.prefill_done()
                    received = True
                    yield delta
                    if delta.finish_reason is not None:
                        return
            except grpc.aio.AioRpcError as exc:
                if (
                    received
                    or attempt == 1
                    or exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
                ):
                    if first is None and not received and not resume.resumed:
                        raise _rpc_error("decode", exc, self.config.retry_after_s) from exc
                    raise DecodeFailure(
                        f"decode worker {decode.worker_id} failed: {exc.code().name}: {exc.details()}",
                        decode.worker_id,
                        failure_reason(exc),
                    ) from exc
                log.warning(
                    "decode worker %s refused %s (%s); trying another",
                    decode.worker_id,
                    request.request_id,
                    exc.code().name,
                )
                tickets.abandon(decision)
                decision = self.route(request, tickets, resume.exclude | {decode.worker_id})
                if first is not None:
                    tickets.prefill_done()  # the retry only decodes; the prompt already ran on P
                decode = decision.decode
            finally:
                conn.release(stream)  # cancels it on the worker unless the worker ended it

    def _delta(
        self, msg: codec.DecodeDelta, first_message: bool, local: bool, request: Request, decode: WorkerInfo
    ) -> Delta:
        """One decode message as a Delta. The first message carries the decoder's admission
        timings and, for a local prefill, its prefix-cache hit."""
        if msg.failed:
            raise DecodeFailure(
                f"the step of decode worker {decode.worker_id} failed", decode.worker_id, MigrationReason.WORKER_FAILED
            )
        if first_message:
            if not local:
                self._observe_stage("transfer", msg.transfer_s)
            self._observe_stage("decode_admission", msg.admit_s)
            if local:
                self.metrics.prefix(len(request.prompt_token_ids), msg.num_cached_tokens)
        return Delta(
            msg.token_ids,
            msg.logprobs,
            msg.finish_reason,
            msg.num_cached_tokens if first_message and local else 0,
            msg.prompt_logprobs if first_message and local else None,
            msg.admit_s if first_message and local else None,
        )

    def _observe_stage(self, stage: str, seconds: float) -> None:
        """Record a duration a worker reported; a nonsensical one is ignored, not fatal."""
        if math.isfinite(seconds) and seconds >= 0:
            self.metrics.observe_stage(stage, seconds)

    def _release_soon(self, prefill: WorkerInfo, handle: KVHandle, metadata: tuple[tuple[str, str], ...]) -> None:
        """Tell a prefill worker to drop the lease of a request that will not be decoded: the
        ReleaseKV that the decode worker would have sent, with the handle's lease secret. It goes
        to the registered address of the worker that answered the Prefill, with the metadata of
        the request's other calls."""
        release = self.clients.channel(prefill.address).unary_unary(
            f"/{kv_codec.KV_TRANSFER_SERVICE}/ReleaseKV",
            request_serializer=kv_codec.release_kv_request_to_bytes,
            response_deserializer=kv_codec.release_kv_response_from_bytes,
        )

        async def release_lease() -> None:
            try:
                request = kv_codec.ReleaseKVRequest(handle.request_id, handle.lease_secret)
                await release(request, timeout=_ABORT_TIMEOUT_S, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                log.info(
                    "release of %s on %s failed: %s (its lease will expire)",
                    handle.request_id,
                    prefill.worker_id,
                    exc.code().name,
                )

        self._background_task(release_lease())

    def _background_task(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` off the request's path; its task is kept until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _rpc_error(stage: str, exc: grpc.aio.AioRpcError, retry_after_s: int) -> OpenAIError:
    code = exc.code()
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(f"{stage} refused the request: {exc.details()}")
    return service_unavailable(f"{stage} failed: {code.name}: {exc.details()}", retry_after_s)
