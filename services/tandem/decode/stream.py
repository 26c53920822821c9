"""The output stream of a decode call: the engine's outputs, coalesced into `DecodeDelta`s.

Who calls it: `DecodeServicer.decode_deltas` (decode/server.py), on the asyncio thread, once
the request is admitted; the handler closes the generator (or ends the direct stream) however
the call ends.

Lifecycle of a stream (steps 5 and 6 of the decode lifecycle in decode/server.py):
1. Tokens stream back as `DecodeDelta`s; several tokens per message when the client is
   slower than the step loop (whatever outputs are ready are coalesced).
2. The first `DecodeDelta` also carries the hand-off and admission report (`FirstDelta`,
   filled in by the hand-off as it goes).
3. A shed output raises `ShedError` (the handler ends RESOURCE_EXHAUSTED with its message); a
   `DrainDeadline` raises `DrainDeadlineReached` once the outputs that came with it are sent
   (the handler aborts the sequence and ends UNAVAILABLE).

Two ways to read them, one rule (`DeltaStream`): a `Decode` call's handler reads a queue
(`stream_deltas`, an async generator: one task wake-up per batch of outputs); a request on the
multiplexed stream gets `DirectDeltas` as its output sink instead, which turns each output
into its delta as the step's outputs reach the asyncio thread and hands it straight to the
stream's sender, so a step costs no wake-up, queue or timer per request; its handler only
waits for the end (`DirectDeltas.run`).

Tracing: "decode.admit" until the batcher first schedules the sequence, then "decode.stream"
until the stream ends, however it ends; both children of the call's "decode" span.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from opentelemetry.trace import Span, Status, StatusCode, Tracer

from tandem.common import codec
from tandem.common.request import FinishReason, TokenLogprob
from tandem.common.tracing import ClockAnchor, child_context
from tandem.engine.outputs import RequestOutput
from tandem.worker.streams import DrainDeadline, OutputQueue


class DrainDeadlineReached(Exception):
    """The worker's drain deadline passed while this stream was open."""


@dataclass
class FirstDelta:
    """What the first DecodeDelta reports about the hand-off and admission; filled in as the
    hand-off goes (asyncio thread only)."""

    num_cached_tokens: int = 0
    num_pulled_blocks: int = 0
    recomputed: bool = False
    transfer_s: float = 0.0
    admit_s: float = 0.0


# Where a multiplexed request's common-case deltas go (`DirectDeltas`): its new token ids and
# their logprobs, no DecodeDelta built (decode/mux.py sends them as `mux_codec.MuxTokens`).
EmitTokens = Callable[[tuple[int, ...], tuple[TokenLogprob, ...]], None]


class ShedError(Exception):
    """The engine shed the request under overload; the message is for its client."""


class DeltaStream:
    """One request's outputs turned into DecodeDeltas (asyncio thread only): the first carries
    `header` and, for a local prefill (`local`), the prompt tokens its admission found cached
    here. Spans: "decode.admit" until the first output's first scheduling, then
    "decode.stream" until `end()`."""

    def __init__(
        self, header: FirstDelta, span: Span, arrival: ClockAnchor, admit_from_s: float, *, local: bool, tracer: Tracer
    ) -> None:
        self._header, self._span, self._arrival = header, span, arrival
        self._admit_from_s, self._local, self._tracer = admit_from_s, local, tracer
        self._parent = child_context(span)
        self._admit = tracer.start_span(
            "decode.admit", context=self._parent, start_time=arrival.unix_ns_at(admit_from_s)
        )
        self._stream: Span | None = None
        self.num_tokens = 0
        self.done = False  # the last delta (finished or failed) was taken
        self.drained: str | None = None  # a DrainDeadline came with the last outputs: its message

    def take(self, items: list[RequestOutput | DrainDeadline]) -> codec.DecodeDelta:
        """The delta of `items` (the outputs that arrived since the last one, in order). Only a
        `DrainDeadline` raises `DrainDeadlineReached`; one that came with outputs is left in
        `drained` for the caller to raise once the delta is sent. A shed raises `ShedError`."""
        drained = next((i for i in items if isinstance(i, DrainDeadline)), None)
        outs = [i for i in items if not isinstance(i, DrainDeadline)]
        if not outs:
            assert drained is not None
            raise DrainDeadlineReached(drained.message)
        self.drained = None if drained is None else drained.message
        span = self._span
        first = self._stream is None
        if first:
            scheduled_s = outs[0].first_scheduled_s
            scheduled_s = max(self._admit_from_s, time.monotonic() if scheduled_s is None else scheduled_s)
            self._header.admit_s = scheduled_s - self._admit_from_s
            self._admit.end(end_time=self._arrival.unix_ns_at(scheduled_s))
            self._stream = self._tracer.start_span(
                "decode.stream", context=self._parent, start_time=self._arrival.unix_ns_at(scheduled_s)
            )
            span.set_attribute("tandem.cached_tokens", outs[0].num_cached_tokens)
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        finish_reason: FinishReason | None = None
        failed = False
        for out in outs:
            if out.shed_message is not None:
                span.set_status(Status(StatusCode.ERROR, out.shed_message))
                raise ShedError(out.shed_message)
            token_ids.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs)
            if out.finish_reason is not None:
                finish_reason = out.finish_reason
                span.set_attribute("gen_ai.response.finish_reasons", (finish_reason.value,))
            elif not out.new_token_ids:  # the step failed and the loop aborted this request
                failed = True
                span.set_status(Status(StatusCode.ERROR, "decode step failed"))
        self.num_tokens += len(token_ids)
        self.done = finish_reason is not None or failed
        delta = codec.DecodeDelta(tuple(token_ids), tuple(logprobs), finish_reason, failed)
        if first:  # the first message also reports the hand-off and the admission
            header = self._header
            delta = dataclasses.replace(
                delta,
                num_cached_tokens=outs[0].num_cached_tokens if self._local else header.num_cached_tokens,
                num_pulled_blocks=header.num_pulled_blocks,
                recomputed=header.recomputed,
                transfer_s=header.transfer_s,
                admit_s=header.admit_s,
                prompt_logprobs=outs[0].prompt_logprobs,  # a local prefill's, when asked for
            )
        return delta

    def take_output(self, out: RequestOutput) -> codec.DecodeDelta:
        """`take([out])`, with a short path for the common case (`take_tokens`)."""
        if self.take_tokens(out):
            return codec.DecodeDelta(out.new_token_ids, out.new_logprobs)
        return self.take([out])

    def take_tokens(self, out: RequestOutput) -> bool:
        """Take `out` if it is the common case, a later output with new tokens that neither
        ends nor sheds the request: its delta is then `DecodeDelta(out.new_token_ids,
        out.new_logprobs)` and nothing else. False (nothing taken) for any other output."""
        if (
            self._stream is None
            or out.finish_reason is not None
            or out.shed_message is not None
            or not out.new_token_ids
        ):
            return False
        self.drained = None
        self.num_tokens += len(out.new_token_ids)
        return True

    def cancelled(self) -> None:
        """The stream was cancelled or closed before its end."""
        (self._admit if self._stream is None else self._stream).set_attribute("tandem.cancelled", True)

    def end(self) -> None:
        """Close the spans (once, however the stream ended)."""
        self._span.set_attribute("gen_ai.usage.output_tokens", self.num_tokens)
        (self._admit if self._stream is None else self._stream).end(end_time=self._arrival.unix_ns_at(time.monotonic()))


async def stream_deltas(
    q: OutputQueue, stream: DeltaStream, *, timeout_s: float
) -> AsyncGenerator[codec.DecodeDelta, None]:
    """Yield `stream`'s DecodeDeltas from `q`, coalescing whatever outputs are ready, until the
    last one; a `DrainDeadline` raises `DrainDeadlineReached` once the outputs that came with
    it are sent. Each wait for outputs is bounded by `timeout_s`. Ends `stream` however it ends
    (finished, failed, cancelled or closed)."""
    try:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow this task's
            # cancellation when q.get() completes at the same moment (gh-86296), and a cancelled
            # request would then run on to its end instead of being aborted
            async with asyncio.timeout(timeout_s):
                items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            yield stream.take(items)
            if stream.done:
                return
            if stream.drained is not None:
                raise DrainDeadlineReached(stream.drained)
    except (asyncio.CancelledError, GeneratorExit):
        stream.cancelled()
        raise
    finally:
        stream.end()


class DirectDeltas:
    """The output sink of a request on the multiplexed stream (worker/streams.py calls
    `put_nowait` on the asyncio thread, with the step's outputs in order): each output becomes
    its delta at once and goes to `emit`, or, in the common case (`DeltaStream.take_tokens`),
    its new tokens and logprobs go to `emit_tokens` without a DecodeDelta being built. Outputs
    that arrive before `run` (the admission's reply can reach the asyncio thread after the
    first step's outputs) wait for it; outputs after the end (a cancelled request's last step)
    are dropped."""

    def __init__(
        self,
        emit: Callable[[codec.DecodeDelta], None],
        emit_tokens: EmitTokens | None = None,
    ) -> None:
        self._emit = emit
        self._emit_tokens = emit_tokens
        self._stream: DeltaStream | None = None
        self._early: list[RequestOutput | DrainDeadline] = []
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_s = 0.0  # time.monotonic() (the loop's clock) of the last output

    def put_nowait(self, item: RequestOutput | DrainDeadline) -> None:
        stream = self._stream
        if self._ended.done():
            return
        if stream is None:
            self._early.append(item)
            return
        self._last_s = time.monotonic()
        emit_tokens = self._emit_tokens
        if emit_tokens is not None and type(item) is RequestOutput and stream.take_tokens(item):
            emit_tokens(item.new_token_ids, item.new_logprobs)  # neither done nor drained
            return
        try:
            delta = stream.take([item]) if isinstance(item, DrainDeadline) else stream.take_output(item)
        except (ShedError, DrainDeadlineReached) as exc:
            self._ended.set_exception(exc)
            return
        self._emit(delta)
        if stream.done:
            self._ended.set_result(None)
        elif stream.drained is not None:
            self._ended.set_exception(DrainDeadlineReached(stream.drained))

    async def run(self, stream: DeltaStream, *, timeout_s: float) -> None:
        """Stream until the last delta; raises as `stream_deltas` would (`ShedError`,
        `DrainDeadlineReached`, TimeoutError when no output came for `timeout_s`). Ends
        `stream` however it ends. One timer per `timeout_s`, not one per step."""
        self._stream, self._last_s = stream, time.monotonic()
        early, self._early = self._early, []
        for item in early:
            self.put_nowait(item)
        try:
            while not self._ended.done():
                remaining_s = self._last_s + timeout_s - time.monotonic()
                if remaining_s <= 0:
                    raise TimeoutError(f"no output for {timeout_s} s")
                await asyncio.wait((self._ended,), timeout=remaining_s)
            self._ended.result()
        except asyncio.CancelledError:
            if not self._ended.done():  # not cancelled after its last delta went out
                stream.cancelled()
            raise
        finally:
            if not self._ended.done():
                self._ended.cancel()  # later outputs are dropped
            elif not self._ended.cancelled():
                self._ended.exception()  # retrieved: a cancelled run leaves no "never retrieved" log
            stream.end()
