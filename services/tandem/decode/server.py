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
   field). Then the handle's block hashes must be the prompt's, computed here, and its source
   a registered, live, compatible prefill worker (decode/handle_check.py); if not, the handle
   is rejected (counted by reason), the source is never dialed, and the prompt is prefilled
   locally.
3. The hand-off (decode/handoff.py): reserve blocks for what the local prefix cache lacks,
   pull the missing full blocks, commit the reservation; if the pull fails, or the pool is
   too full to reserve, the prompt plus first token are recomputed locally: same output.
4. `ReleaseKV` is sent to the source of every handle used (decode/handoff.py).
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
   the pull has stopped writing into the reserved blocks, then takes effect
   (decode/handoff.py).

The multiplexed `DecodeStream` (decode/mux.py) runs each request it carries through the same
steps (`decode_deltas`), with the request's own stand-in for the call's context.

Tracing: a SERVER span "decode" under the caller's trace context, with children "kv.pull"
(with a handle: reserving blocks and pulling the missing ones; decode/handoff.py),
"decode.admit" (until the batcher first schedules the sequence) and "decode.stream" (until
the stream ends, however it ends; both started by decode/stream.py). The first `DecodeDelta`
carries the hand-off and admission durations.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc

from tandem.common import codec
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.tracing import ClockAnchor, ending, request_attributes
from tandem.decode.handoff import HandOffs
from tandem.decode.mux import decode_stream
from tandem.decode.sources import handle_verifier
from tandem.decode.stream import (
    DeltaStream,
    DirectDeltas,
    DrainDeadlineReached,
    EmitTokens,
    FirstDelta,
    ShedError,
    stream_deltas,
)
from tandem.engine.engine import Engine
from tandem.worker.servicer import WorkerServicerBase
from tandem.worker.worker import Worker


class DecodeServicer(WorkerServicerBase):
    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.hand_offs = HandOffs(worker)
        self.verifier = handle_verifier(worker)

    async def abort_owned(self, request_id: str, context: grpc.aio.ServicerContext) -> bool:
        """As for every worker, except during a hand-off: then the abort is applied once the
        pull has stopped writing into the sequence's reserved blocks."""
        if self.hand_offs.abort(request_id):
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
        emit_tokens: EmitTokens | None = None,
    ) -> AsyncGenerator[codec.DecodeDelta, None]:
        """One decode request, steps 1 to 7 above: the deltas of its stream. It ends however the
        call would (`context.abort`); closing it (or cancelling its task) aborts the sequence.
        Used by `Decode` and by the multiplexed `DecodeStream` (decode/mux.py), whose `context`
        is the request's own. With `emit` (the multiplexed stream), each delta goes to `emit` on
        the asyncio thread as its output arrives (decode/stream.py `DirectDeltas`; the common
        case's tokens and logprobs to `emit_tokens` when given) and none is yielded."""
        worker = self.worker
        with ending(worker.server_span("decode", context, arrival), arrival) as span:
            await worker.refuse_if_draining(context)
            req, handle = call.request, call.handle
            await self.owners.claim(req.request_id, context)
            await worker.compile_grammar(req.sampling, context)
            span.set_attributes(request_attributes(req.request_id, len(req.prompt_token_ids), req.sampling))
            header = FirstDelta()
            if handle is not None:
                await self.hand_offs.check(handle, req, context)
                if not await self.verifier.accept(handle, req, span):
                    handle, header.recomputed = None, True  # prefilled here; the source is never dialed
            direct = DirectDeltas(emit, emit_tokens) if emit is not None else None
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
                    admit_from_s = await self.hand_offs.run(
                        req, first[0], handle, header, deliver, context, span, arrival
                    )
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
                if not self.hand_offs.is_pulling(rid):
                    worker.abort_soon(rid)
                raise


def add_servicers(worker: Worker, server: grpc.aio.Server) -> None:
    pb_grpc.add_WorkerServicer_to_server(DecodeServicer(worker), server)
