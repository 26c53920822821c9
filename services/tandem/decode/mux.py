"""The multiplexed decode stream, worker side: `DecodeStream`, one long-lived bidirectional
stream per (gateway, decode worker) pair that carries all of that gateway's decode requests.

Lifecycle of a stream (DESIGN.md section 4, "Wire format"):
1. The gateway opens the stream on first use (the interceptor checks the cluster token once,
   for the stream) and keeps it for every later request to this worker.
2. Each `MuxSubmit` runs as its own task, exactly as a `Decode` call with the same request
   (decode/server.py `decode_deltas`): the same checks, hand-off, admission, refusals and
   spans. The submit's owner secret and trace context stand in for a call's metadata
   (`RequestContext`), so `Abort` with that secret acts on it as on a Decode call's request.
3. The requests' deltas of one engine step are sent as one `MuxStep`, encoded once: the step
   loop hands a step's outputs to this thread in one call (worker/streams.py), where each
   becomes its request's delta at once (decode/stream.py `DirectDeltas`: no task wakes per
   request and step), then the sender, woken once, sends what they produced (with whatever
   else came while a write was in flight). An output that a request's task emits (a refusal,
   an error) goes with the next message.
4. A request ends with a delta that has a finish reason, or with an output holding the status
   its Decode call would have ended with (`error_code`, `error_details`): a refusal, the drain
   deadline, a shed, a failed step. Its task is then gone.
5. `MuxCancel(request_id)` cancels the request's task: the sequence is aborted within one
   step, as for a cancelled Decode call. An id not live on this stream is ignored.
6. The gateway half-closes the stream: the live requests finish, then the stream ends. The
   stream breaks (the gateway died, the connection reset, the server stops): every live
   request's task is cancelled, so each sequence is aborted within one step and its blocks
   and lease freed.

Validation: every message passes the codec's checks. A malformed submit that names a request
id is refused for that request (INVALID_ARGUMENT); a message that names none, a duplicate
submit of a live request id, or more than MAX_LIVE_REQUESTS live requests on one stream ends
the stream INVALID_ARGUMENT (the peer is broken).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, NoReturn, Protocol, cast

import grpc

from tandem.common import codec, mux_codec
from tandem.common.ownership import owner_metadata
from tandem.common.request import TokenLogprob
from tandem.common.tracing import ClockAnchor
from tandem.decode.stream import EmitTokens

log = logging.getLogger(__name__)

MAX_LIVE_REQUESTS = 1 << 14  # requests in flight on one stream


class DecodesRequests(Protocol):
    """What a stream needs of the decode servicer (decode/server.py `DecodeServicer`)."""

    def decode_deltas(
        self,
        call: codec.DecodeRequest,
        context: grpc.aio.ServicerContext,
        arrival: ClockAnchor,
        emit: Callable[[codec.DecodeDelta], None] | None = None,
        emit_tokens: EmitTokens | None = None,
    ) -> AsyncGenerator[codec.DecodeDelta, None]: ...


class RequestEnded(Exception):
    """A multiplexed request ended as its Decode call would have ended: status `code`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class RequestContext:
    """The per-request stand-in for a Decode call's `grpc.aio.ServicerContext`: the parts that
    `decode_deltas` uses. `abort` raises `RequestEnded`; the metadata is the submit's owner
    secret and trace context; done callbacks run when the request's task ends."""

    def __init__(self, submit: mux_codec.MuxSubmit) -> None:
        owner = (owner_metadata(submit.owner_secret),) if submit.owner_secret else ()
        self._metadata = (*owner, *submit.trace_context)
        self._done: list[Callable[[Any], None]] = []

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise RequestEnded(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._done.append(callback)

    def done(self) -> None:
        for callback in self._done:
            callback(self)
        self._done.clear()


class StreamProtocolError(Exception):
    """The gateway broke the stream's protocol; the stream ends INVALID_ARGUMENT."""


class MuxSession:
    """One `DecodeStream` call: its live requests and the outputs not sent yet. Asyncio
    thread only; owned by the handler, which ends it (`close`) however the call ends."""

    def __init__(self, servicer: DecodesRequests) -> None:
        self._servicer = servicer
        self._live: dict[str, asyncio.Task] = {}
        self._pending: list[mux_codec.MuxOutput | mux_codec.MuxTokens] = []
        self._wakeup = asyncio.Event()
        self._broken = False  # reading failed: the call is over
        self._protocol_error: str | None = None

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Yield one `MuxStep` (protobuf) per batch of outputs until the stream is over."""
        reader = asyncio.create_task(self._read(requests))
        reader.add_done_callback(lambda _: self._wakeup.set())
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                if self._pending:
                    batch, self._pending = self._pending, []
                    yield mux_codec.mux_step_to_proto(batch)
                if self._protocol_error is not None:
                    raise StreamProtocolError(self._protocol_error)
                if self._broken:
                    return
                if reader.done() and not self._live and not self._pending:
                    return
        finally:
            reader.cancel()
            self.close()

    def close(self) -> None:
        """Cancel every live request: each task aborts its sequence (within one step)."""
        for task in self._live.values():
            task.cancel()

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for msg in requests:
                try:
                    messages = mux_codec.mux_client_messages(msg)  # a batch's, in order
                except mux_codec.MuxMessageError as exc:
                    self._refuse(exc)
                    continue
                for one in messages:
                    self._take(one)
                    if self._protocol_error is not None:
                        return
        except Exception as exc:  # the stream broke: the handler ends and cancels the requests
            log.info("decode stream broke while reading: %r", exc)
            self._broken = True

    def _take(self, msg: Any) -> None:
        """One submit or cancel from the gateway (protobuf)."""
        try:
            item = mux_codec.mux_client_message_from_proto(msg)
        except mux_codec.MuxMessageError as exc:
            self._refuse(exc)
            return
        if isinstance(item, str):
            task = self._live.get(item)
            if task is not None:
                task.cancel()
            return
        self._start(item)

    def _refuse(self, exc: mux_codec.MuxMessageError) -> None:
        if exc.request_id is None or exc.request_id in self._live:
            self._protocol_error = f"malformed message: {exc}"
            return
        self._emit(mux_codec.MuxOutput(exc.request_id, None, grpc.StatusCode.INVALID_ARGUMENT.value[0], str(exc)))

    def _start(self, submit: mux_codec.MuxSubmit) -> None:
        rid = submit.call.request.request_id
        if rid in self._live:
            self._protocol_error = f"duplicate submit of live request {rid!r}"
        elif len(self._live) >= MAX_LIVE_REQUESTS:
            self._protocol_error = f"more than {MAX_LIVE_REQUESTS} live requests on one stream"
        else:
            self._live[rid] = asyncio.create_task(self._serve(rid, submit, ClockAnchor.now()))

    async def _serve(self, rid: str, submit: mux_codec.MuxSubmit, arrival: ClockAnchor) -> None:
        """One request: its deltas, or the status that ends it, as outputs of the stream."""
        context = RequestContext(submit)

        def emit(delta: codec.DecodeDelta) -> None:
            self._emit(mux_codec.MuxOutput(rid, delta))

        def emit_tokens(token_ids: tuple[int, ...], logprobs: tuple[TokenLogprob, ...]) -> None:
            self._pending.append((rid, token_ids, logprobs))  # MuxTokens: the common case, lean
            self._wakeup.set()

        # `context` has what decode_deltas uses of a ServicerContext (see RequestContext); the
        # deltas go to `emit` (`emit_tokens`) as the step's outputs arrive (decode/stream.py
        # `DirectDeltas`)
        deltas = self._servicer.decode_deltas(
            submit.call, cast(grpc.aio.ServicerContext, context), arrival, emit, emit_tokens
        )
        try:
            async with aclosing(deltas):
                async for delta in deltas:  # none: they went to `emit`
                    emit(delta)
        except RequestEnded as exc:
            self._emit(mux_codec.MuxOutput(rid, None, exc.code.value[0], exc.details))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # as gRPC ends a Decode call whose handler raised
            log.exception("decode of %s failed", rid)
            self._emit(mux_codec.MuxOutput(rid, None, grpc.StatusCode.UNKNOWN.value[0], f"Unexpected {exc!r}"))
        finally:
            context.done()
            del self._live[rid]
            self._wakeup.set()

    def _emit(self, output: mux_codec.MuxOutput) -> None:
        self._pending.append(output)
        self._wakeup.set()


async def decode_stream(servicer: DecodesRequests, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    """The `DecodeStream` handler's body (decode/server.py delegates to it)."""
    session = MuxSession(servicer)
    try:
        async for step in session.run(requests):
            yield step
    except StreamProtocolError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
