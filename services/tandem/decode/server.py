"""The decode worker: pulls a prompt's KV from a prefill worker and streams the rest.

Lifecycle of a request here (DESIGN.md section 2, steps 4 to 6):
1. `Decode(request, first_token, handle)`. Without a handle, the prompt is prefilled here.
   With `structured_output`, the call waits (asyncio thread) for its grammar to compile (a
   bad one is INVALID_ARGUMENT); the sequence's matcher replays the first token before the
   next is sampled, so the output equals a colocated run's. A migration's replay
   (`Request.num_generated`) adds its trailing tokens to the sequence as generated output,
   before the first token (the matcher replays them too); the handle covers them with the
   prompt.
2. With one, the handle's layout must equal ours (else FAILED_PRECONDITION naming the
   field; `KVHandle.check` is the receiver's one layout check of the transfer). Then the
   handle's block hashes must be the prompt's, computed here, and its source a registered,
   live, compatible prefill worker (decode/handle_check.py); if not, the handle is rejected
   (counted by reason), the source is never dialed, and the prompt is prefilled locally.
   The loop thread matches the prompt against the local prefix cache and reserves blocks
   for the rest; only the missing full blocks are pulled, each chunk verified.
3. On success the reservation is committed: the sequence joins the batch with its full
   blocks computed (a partial last block is recomputed with the first token). If the pull
   fails (peer gone, checksum, timeout, refused), the blocks are given back and the prompt
   plus first token are recomputed locally: same output. If the pool is too full to
   reserve, the request is prefilled locally too.
4. `ReleaseKV` is sent to the source of every handle used (best effort; its lease also expires),
   unless the pull released the lease already: a verified same-host one-copy pull does, on its
   own stream (kvtransfer/shm_pool_source.py; the worker's transport is `release_with_pull`).
5. Tokens stream back as `DecodeDelta`s (decode/stream.py); several tokens per message when
   the client is slower than the step loop. A cancelled stream aborts the sequence within
   one step.
6. Draining, the stream goes on until it finishes. If the worker's drain deadline passes
   first, the stream sends the tokens it has, aborts the sequence and ends UNAVAILABLE
   "worker {id} is draining: ...": the gateway resumes it on another decode worker.
7. Busy, abort and shed. With `max_waiting` sequences waiting (queued, reserved or ready), a
   new call (with a handle: before anything is reserved or pulled) sheds a less important
   queued sequence or is refused at once with RESOURCE_EXHAUSTED "worker ID is busy: ...". A
   shed sequence's stream ends at once with RESOURCE_EXHAUSTED "shed: priority P request
   displaced by priority Q under overload". An `Abort` call ends the stream at once with a
   last `DecodeDelta` whose finish reason is ABORT; during a hand-off the abort waits until
   the pull has stopped writing into the reserved blocks, then takes effect.

The multiplexed `DecodeStream` (decode/mux.py) runs each request it carries through the same
steps (`decode_deltas`), with the request's own stand-in for the call's context.

Tracing: a SERVER span "decode" under the caller's trace context, with children "kv.pull"
(with a handle: reserving blocks and pulling the missing ones), "decode.admit" (until the
batcher first schedules the sequence) and "decode.stream" (until the stream ends, however it
ends; both started by decode/stream.py). The first `DecodeDelta` carries the hand-off and
admission durations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
from opentelemetry.trace import Span, Status, StatusCode

from tandem.common import codec
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import LayoutMismatchError
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.request import Request
from tandem.common.tracing import ClockAnchor, child_context, ending, request_attributes
from tandem.decode.mux import decode_stream
from tandem.decode.sources import handle_verifier
from tandem.decode.stream import (
    DeltaStream,
    DirectDeltas,
    DrainDeadlineReached,
    FirstDelta,
    ShedError,
    stream_deltas,
)
from tandem.engine.engine import Engine
from tandem.engine.outputs import RequestOutput, Reservation
from tandem.kvtransfer.base import KVTransferError
from tandem.worker.servicer import WorkerServicerBase
from tandem.worker.worker import Worker

log = logging.getLogger(__name__)


class DecodeServicer(WorkerServicerBase):
    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.store = worker.kv_store
        self.transport = worker.transport
        # Requests whose pull is writing into reserved blocks: they are aborted only once
        # the pull has stopped, so freed blocks are never written.
        self._pulling: set[str] = set()
        # Requests in a hand-off (reserve, pull, admit) -> whether an Abort call came meanwhile;
        # that abort is applied with the admission. Asyncio thread only.
        self._handing_off: dict[str, bool] = {}
        self._background: set[asyncio.Task] = set()
        self.verifier = handle_verifier(worker)

    async def abort_owned(self, request_id: str, context: grpc.aio.ServicerContext) -> bool:
        """As for every worker, except during a hand-off: then the abort is applied once the
        pull has stopped writing into the sequence's reserved blocks."""
        if request_id in self._handing_off:
            self._handing_off[request_id] = True
            return True
        return await super().abort_owned(request_id, context)

    async def Decode(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """`request` and the messages yielded are protobuf, straight from and to the codec."""
        arrival = ClockAnchor.now()
        try:
            call = codec.decode_request_from_proto(request)
        except ValueError as exc:
            with ending(self.worker.server_span("decode", context, arrival), arrival):
                await self.worker.refuse_if_draining(context)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        async with aclosing(self.decode_deltas(call, context, arrival)) as deltas:
            async for delta in deltas:
                yield codec.decode_delta_to_proto(delta)

    async def DecodeStream(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        """The multiplexed decode stream of one gateway (decode/mux.py): protobuf in and out."""
        async for step in decode_stream(self, request_iterator, context):
            yield step

    async def decode_deltas(
        self,
        call: codec.DecodeRequest,
        context: grpc.aio.ServicerContext,
        arrival: ClockAnchor,
        emit: Callable[[codec.DecodeDelta], None] | None = None,
    ) -> AsyncGenerator[codec.DecodeDelta, None]:
        """One decode request, steps 1 to 7 above: the deltas of its stream. It ends however the
        call would (`context.abort`); closing it (or cancelling its task) aborts the sequence.
        Used by `Decode` and by the multiplexed `DecodeStream` (decode/mux.py), whose `context`
        is the request's own. With `emit` (the multiplexed stream), each delta goes to `emit` on
        the asyncio thread as its output arrives (decode/stream.py `DirectDeltas`) and none is
        yielded."""
        worker = self.worker
        with ending(worker.server_span("decode", context, arrival), arrival) as span:
            await worker.refuse_if_draining(context)
            req, handle = call.request, call.handle
            await self.owners.claim(req.request_id, context)
            await worker.compile_grammar(req.sampling, context)
            span.set_attributes(request_attributes(req.request_id, len(req.prompt_token_ids), req.sampling))
            header = FirstDelta()
            if handle is not None:
                await self._check_handle(handle, req, context)
                if not await self.verifier.accept(handle, req, span):
                    handle, header.recomputed = None, True  # prefilled here; the source is never dialed
            direct = DirectDeltas(emit) if emit is not None else None
            q, deliver = (None, worker.output_sink(direct)) if direct is not None else worker.output_queue()
            # vLLM's per-request series; the prefill worker recorded the prompt's (request_metrics.py)
            deliver = worker.request_recorder(req, arrival, prefilled_elsewhere=call.first_token is not None).wrap(
                deliver
            )
            first = [call.first_token] if call.first_token is not None else []
            rid = req.request_id

            def admit_local(engine: Engine) -> None:
                engine.add_request(
                    rid,
                    req.original_prompt_token_ids,
                    req.sampling,
                    req.cache_salt,
                    generated_token_ids=[*req.generated_token_ids, *first],
                    priority=req.priority,
                    max_waiting=worker.config.max_waiting,
                )
                worker.loop.subscribe(rid, deliver)

            try:
                if handle is None:
                    admit_from_s = arrival.monotonic_s
                    await worker.call(admit_local, context)
                else:
                    self._handing_off[rid] = False
                    try:
                        admit_from_s = await self._hand_off(
                            req, first[0], handle, header, deliver, context, span, arrival
                        )
                    finally:
                        self._handing_off.pop(rid, None)
                stream = DeltaStream(
                    header, span, arrival, admit_from_s, local=handle is None, tracer=worker.tracing.tracer
                )
                timeout_s = worker.config.request_timeout_s
                if direct is not None:
                    await direct.run(stream, timeout_s=timeout_s)
                    return
                assert q is not None
                async with aclosing(stream_deltas(q, stream, timeout_s=timeout_s)) as deltas:
                    async for delta in deltas:
                        yield delta
            except DrainDeadlineReached as exc:
                worker.abort_soon(rid)
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except ShedError as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except (asyncio.CancelledError, GeneratorExit):
                # GeneratorExit: gRPC was sending when the client went away and closed this stream
                if rid not in self._pulling:
                    worker.abort_soon(rid)
                raise

    async def _check_handle(self, handle: KVHandle, req: Request, context: grpc.aio.ServicerContext) -> None:
        """The receiver's one layout check of a transfer, before anything is reserved."""
        try:
            handle.check(self.worker.layout, req.request_id, len(req.prompt_token_ids))
        except LayoutMismatchError as exc:
            self.worker.metrics.kv_transfer_failure("layout_mismatch")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _hand_off(
        self,
        req: Request,
        first_token: int,
        handle: KVHandle,
        header: FirstDelta,
        deliver: Callable[[RequestOutput], None],
        context: grpc.aio.ServicerContext,
        span: Span,
        arrival: ClockAnchor,
    ) -> float:
        """Reserve, pull (or fall back to recompute), release the source, admit. Returns when
        (monotonic seconds) the hand-off ended; the "kv.pull" span and `transfer_s` cover it."""
        worker = self.worker
        rid = req.request_id
        max_waiting = worker.config.max_waiting
        start_s = time.monotonic()
        pull_span = worker.tracing.tracer.start_span(
            "kv.pull",
            context=child_context(span),
            start_time=arrival.unix_ns_at(start_s),
            attributes={"tandem.kv.source_worker_id": handle.source_worker_id},
        )
        with ending(pull_span, arrival):
            reservation = await worker.call(
                lambda e: e.reserve(
                    rid,
                    req.original_prompt_token_ids,
                    req.sampling,
                    first_token,
                    req.cache_salt,
                    generated_token_ids=req.generated_token_ids,
                    priority=req.priority,
                    max_waiting=max_waiting,
                ),
                context,
            )
            num_bytes = (
                await self._pull(rid, handle, reservation, header, pull_span) if reservation is not None else None
            )
            pull_span.set_attributes(
                {
                    "tandem.kv.blocks": header.num_pulled_blocks,
                    "tandem.kv.bytes": num_bytes or 0,
                    "tandem.kv.recomputed": num_bytes is None,
                }
            )
        end_s = time.monotonic()  # not before the span's end: "decode.admit" starts here
        header.transfer_s = end_s - start_s
        release = asyncio.get_running_loop().create_task(
            self.transport.release(handle, worker.config.kv_transfer.pull_timeout_s)
        )
        self._background.add(release)  # keep a reference until done
        release.add_done_callback(self._background.discard)
        pulled = num_bytes is not None
        aborted = self._handing_off.pop(rid)  # an Abort call during the hand-off

        def admit(engine: Engine) -> None:
            if reservation is None:
                engine.add_request(
                    rid,
                    req.original_prompt_token_ids,
                    req.sampling,
                    req.cache_salt,
                    generated_token_ids=[*req.generated_token_ids, first_token],
                    priority=req.priority,
                    max_waiting=max_waiting,
                )
            elif pulled:
                engine.commit(rid)
            else:
                engine.unreserve(rid)
            worker.loop.subscribe(rid, deliver)
            if aborted:
                engine.abort(rid)  # the stream gets its final ABORT output after this command

        if not pulled:
            header.recomputed = True
            worker.metrics.kv_recomputes.inc()
        await worker.call(admit, context)
        return end_s

    async def _pull(
        self, rid: str, handle: KVHandle, reservation: Reservation, header: FirstDelta, pull_span: Span
    ) -> int | None:
        """Pull the blocks missing from `reservation`; bytes moved, or None if the pull failed
        (then the prompt is recomputed)."""
        worker = self.worker
        header.num_cached_tokens = reservation.num_cached_blocks * worker.layout.block_size
        worker.metrics.kv_local_hit_blocks.inc(reservation.num_cached_blocks)
        src = handle.block_ids[reservation.num_cached_blocks : reservation.num_full_blocks]
        if not src:
            return 0
        try:
            pull = asyncio.ensure_future(
                self.transport.pull(
                    handle, src, reservation.missing_block_ids, self.store, worker.config.kv_transfer.pull_timeout_s
                )
            )
            self._pulling.add(rid)
            try:
                stats = await asyncio.shield(pull)
            except asyncio.CancelledError:
                pull.add_done_callback(lambda _: self._abort_after_pull(rid))
                raise
            self._pulling.discard(rid)
        except Exception as exc:  # any failure of the hand-off falls back to recompute
            self._pulling.discard(rid)
            reason = exc.reason.value if isinstance(exc, KVTransferError) else "internal"
            worker.metrics.kv_transfer_failure(reason)
            pull_span.set_status(Status(StatusCode.ERROR, f"{reason}: {exc}"))
            log.warning("KV pull for %s failed (%s): recomputing locally", rid, exc)
            return None
        worker.metrics.kv_transfer_bytes.inc(stats.bytes_moved)
        worker.metrics.kv_transfer_blocks.inc(stats.num_blocks)
        worker.metrics.kv_transfer_seconds.observe(stats.seconds)
        worker.metrics.kv_pull(stats.transport or self.transport.name, stats.shm_fallback)
        header.num_pulled_blocks = stats.num_blocks
        return stats.bytes_moved

    def _abort_after_pull(self, rid: str) -> None:
        self._pulling.discard(rid)
        self.worker.abort_soon(rid)


def add_servicers(worker: Worker, server: grpc.aio.Server) -> None:
    pb_grpc.add_WorkerServicer_to_server(DecodeServicer(worker), server)
