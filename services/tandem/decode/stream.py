"""The output stream of a decode call: the engine's outputs, coalesced into `DecodeDelta`s.

Who calls it: `DecodeServicer.Decode` (decode/server.py), on the asyncio thread, once the
request is admitted; the handler closes the generator however the call ends.

Lifecycle of a stream (steps 5 and 6 of the decode lifecycle in decode/server.py):
1. Tokens stream back as `DecodeDelta`s; several tokens per message when the client is
   slower than the step loop (whatever outputs are ready are coalesced).
2. The first `DecodeDelta` also carries the hand-off and admission report (`FirstDelta`,
   filled in by the hand-off as it goes).
3. A shed output raises `ShedError` (the handler ends RESOURCE_EXHAUSTED with its message); a
   `DrainDeadline` on the queue raises `DrainDeadlineReached` once the outputs that came with
   it are sent (the handler aborts the sequence and ends UNAVAILABLE).

Tracing: "decode.admit" until the batcher first schedules the sequence, then "decode.stream"
until the stream ends, however it ends; both children of the call's "decode" span.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from opentelemetry.trace import Span, Status, StatusCode, Tracer

from tandem.common import codec
from tandem.common.request import FinishReason, TokenLogprob
from tandem.common.tracing import ClockAnchor, child_context
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


class ShedError(Exception):
    """The engine shed the request under overload; the message is for its client."""


async def stream_deltas(
    q: OutputQueue,
    header: FirstDelta,
    span: Span,
    arrival: ClockAnchor,
    admit_from_s: float,
    *,
    local: bool,
    tracer: Tracer,
    timeout_s: float,
) -> AsyncGenerator[codec.DecodeDelta, None]:
    """Yield DecodeDeltas, coalescing whatever outputs are ready; the first carries header
    and, for a local prefill (`local`), the prompt tokens its admission found cached here.
    A `DrainDeadline` on the queue raises `DrainDeadlineReached` once the outputs that came
    with it are sent. Each wait for outputs is bounded by `timeout_s`. Spans: "decode.admit"
    until the first output's first scheduling, then "decode.stream" until this generator ends
    (finished, failed, cancelled or closed)."""
    parent = child_context(span)
    admit = tracer.start_span("decode.admit", context=parent, start_time=arrival.unix_ns_at(admit_from_s))
    stream: Span | None = None
    num_tokens = 0
    try:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow this task's
            # cancellation when q.get() completes at the same moment (gh-86296), and a cancelled
            # request would then run on to its end instead of being aborted
            async with asyncio.timeout(timeout_s):
                items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            drained = next((i for i in items if isinstance(i, DrainDeadline)), None)
            outs = [i for i in items if not isinstance(i, DrainDeadline)]
            if not outs:
                assert drained is not None
                raise DrainDeadlineReached(drained.message)
            first = stream is None
            if first:
                scheduled_s = outs[0].first_scheduled_s
                scheduled_s = max(admit_from_s, time.monotonic() if scheduled_s is None else scheduled_s)
                header.admit_s = scheduled_s - admit_from_s
                admit.end(end_time=arrival.unix_ns_at(scheduled_s))
                stream = tracer.start_span("decode.stream", context=parent, start_time=arrival.unix_ns_at(scheduled_s))
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
            num_tokens += len(token_ids)
            delta = codec.DecodeDelta(tuple(token_ids), tuple(logprobs), finish_reason, failed)
            if first:  # the first message also reports the hand-off and the admission
                delta = dataclasses.replace(
                    delta,
                    num_cached_tokens=outs[0].num_cached_tokens if local else header.num_cached_tokens,
                    num_pulled_blocks=header.num_pulled_blocks,
                    recomputed=header.recomputed,
                    transfer_s=header.transfer_s,
                    admit_s=header.admit_s,
                    prompt_logprobs=outs[0].prompt_logprobs,  # a local prefill's, when asked for
                )
            yield delta
            if finish_reason is not None or failed:
                return
            if drained is not None:
                raise DrainDeadlineReached(drained.message)
    except (asyncio.CancelledError, GeneratorExit):
        (admit if stream is None else stream).set_attribute("tandem.cancelled", True)
        raise
    finally:
        span.set_attribute("gen_ai.usage.output_tokens", num_tokens)
        (admit if stream is None else stream).end(end_time=arrival.unix_ns_at(time.monotonic()))
