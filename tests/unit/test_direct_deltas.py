"""The multiplexed stream's per-request output sink (decode/stream.py `DirectDeltas`): each
output becomes its delta where it arrives, in order, with the first delta's header; early
outputs wait for `run`; the ends (finish, failed step, shed, drain deadline, no output for
the timeout, cancellation) are those of `stream_deltas`, and the spans end however it ends."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tandem.common import codec
from tandem.common.request import FinishReason, TokenLogprob
from tandem.common.tracing import ClockAnchor
from tandem.decode.stream import DeltaStream, DirectDeltas, DrainDeadlineReached, FirstDelta, ShedError
from tandem.engine.outputs import RequestOutput
from tandem.worker.streams import DrainDeadline


class Setup:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("test")
        self.span = self.tracer.start_span("decode")
        self.deltas: list[codec.DecodeDelta] = []
        self.header = FirstDelta(num_cached_tokens=32, num_pulled_blocks=2, transfer_s=0.5)
        self.arrival = ClockAnchor.now()

    def stream(self) -> DeltaStream:
        return DeltaStream(
            self.header, self.span, self.arrival, self.arrival.monotonic_s, local=False, tracer=self.tracer
        )

    def spans(self) -> dict[str, dict[str, object]]:
        return {s.name: dict(s.attributes or {}) for s in self.exporter.get_finished_spans()}


def out(tokens: tuple[int, ...], finish: FinishReason | None = None, **kw: object) -> RequestOutput:
    return RequestOutput("r", tokens, (), finish, time.monotonic(), 0, **kw)  # type: ignore[arg-type]


async def _test_outputs_become_deltas_in_order_and_early_ones_wait_for_run() -> None:
    s = Setup()
    sink = DirectDeltas(s.deltas.append)
    sink.put_nowait(out((5,)))  # before run: the admission's reply came after the first step
    assert s.deltas == []
    lp = (TokenLogprob(7, -0.5),)
    run = asyncio.ensure_future(sink.run(s.stream(), timeout_s=5.0))
    await asyncio.sleep(0)
    sink.put_nowait(RequestOutput("r", (7,), lp, None))
    sink.put_nowait(out((8,), FinishReason.LENGTH))
    await run
    sink.put_nowait(out((9,)))  # after the end: dropped
    first, second, last = s.deltas
    assert (first.token_ids, first.num_cached_tokens, first.num_pulled_blocks, first.transfer_s) == ((5,), 32, 2, 0.5)
    assert first.admit_s == s.header.admit_s >= 0
    assert second == codec.DecodeDelta((7,), lp)
    assert last == codec.DecodeDelta((8,), (), FinishReason.LENGTH)
    assert len(s.deltas) == 3
    assert s.spans()["decode.stream"] == {}
    s.span.end()
    assert s.spans()["decode"]["gen_ai.usage.output_tokens"] == 3


async def _test_the_common_case_goes_to_emit_tokens_and_every_other_delta_to_emit() -> None:
    s = Setup()
    sent: list[object] = []
    sink = DirectDeltas(sent.append, lambda ids, lps: sent.append((ids, lps)))
    run = asyncio.ensure_future(sink.run(s.stream(), timeout_s=5.0))
    await asyncio.sleep(0)
    lp = (TokenLogprob(7, -0.5),)
    sink.put_nowait(out((5,)))  # the first: its header needs a DecodeDelta
    sink.put_nowait(RequestOutput("r", (7,), lp, None))
    sink.put_nowait(out((8, 9)))
    sink.put_nowait(out((10,), FinishReason.STOP))  # the last: its finish reason
    await run
    first, second, third, last = sent
    assert isinstance(first, codec.DecodeDelta) and first.token_ids == (5,) and first.num_pulled_blocks == 2
    assert (second, third) == (((7,), lp), ((8, 9), ()))
    assert last == codec.DecodeDelta((10,), (), FinishReason.STOP)
    s.span.end()
    assert s.spans()["decode"]["gen_ai.usage.output_tokens"] == 5


async def _test_a_failed_step_ends_the_stream_with_a_failed_delta() -> None:
    s = Setup()
    sink = DirectDeltas(s.deltas.append)
    run = asyncio.ensure_future(sink.run(s.stream(), timeout_s=5.0))
    await asyncio.sleep(0)
    sink.put_nowait(out((5,)))
    sink.put_nowait(out(()))  # the loop aborted it after a failed step: no tokens, no reason
    await run
    assert [d.failed for d in s.deltas] == [False, True]


async def _test_shed_raises_shed_error() -> None:
    s = Setup()
    sink = DirectDeltas(s.deltas.append)
    run = asyncio.ensure_future(sink.run(s.stream(), timeout_s=5.0))
    await asyncio.sleep(0)
    sink.put_nowait(out((), FinishReason.ABORT, shed_message="shed: displaced"))
    with pytest.raises(ShedError, match="shed: displaced"):
        await run
    assert s.deltas == []


async def _test_drain_deadline_raises_after_the_deltas_before_it() -> None:
    s = Setup()
    sink = DirectDeltas(s.deltas.append)
    run = asyncio.ensure_future(sink.run(s.stream(), timeout_s=5.0))
    await asyncio.sleep(0)
    sink.put_nowait(out((5,)))
    sink.put_nowait(DrainDeadline("worker d is draining: deadline"))
    with pytest.raises(DrainDeadlineReached, match="worker d is draining: deadline"):
        await run
    assert [d.token_ids for d in s.deltas] == [(5,)]


async def _test_no_output_for_the_timeout_raises_timeout_error() -> None:
    s = Setup()
    sink = DirectDeltas(s.deltas.append)
    run = asyncio.ensure_future(sink.run(s.stream(), timeout_s=0.2))
    await asyncio.sleep(0.12)
    sink.put_nowait(out((5,)))  # progress: the bound starts over
    await asyncio.sleep(0.12)
    assert not run.done()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run, 1.0)
    assert [d.token_ids for d in s.deltas] == [(5,)]


async def _test_cancellation_marks_and_ends_the_span_and_later_outputs_are_dropped() -> None:
    s = Setup()
    sink = DirectDeltas(s.deltas.append)
    run = asyncio.ensure_future(sink.run(s.stream(), timeout_s=5.0))
    await asyncio.sleep(0)
    sink.put_nowait(out((5,)))
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    sink.put_nowait(out((6,)))
    assert [d.token_ids for d in s.deltas] == [(5,)]
    assert s.spans()["decode.stream"] == {"tandem.cancelled": True}


def test_outputs_become_deltas_in_order_and_early_ones_wait_for_run() -> None:
    asyncio.run(_test_outputs_become_deltas_in_order_and_early_ones_wait_for_run())


def test_the_common_case_goes_to_emit_tokens_and_every_other_delta_to_emit() -> None:
    asyncio.run(_test_the_common_case_goes_to_emit_tokens_and_every_other_delta_to_emit())


def test_a_failed_step_ends_the_stream_with_a_failed_delta() -> None:
    asyncio.run(_test_a_failed_step_ends_the_stream_with_a_failed_delta())


def test_shed_raises_shed_error() -> None:
    asyncio.run(_test_shed_raises_shed_error())


def test_drain_deadline_raises_after_the_deltas_before_it() -> None:
    asyncio.run(_test_drain_deadline_raises_after_the_deltas_before_it())


def test_no_output_for_the_timeout_raises_timeout_error() -> None:
    asyncio.run(_test_no_output_for_the_timeout_raises_timeout_error())


def test_cancellation_marks_and_ends_the_span_and_later_outputs_are_dropped() -> None:
    asyncio.run(_test_cancellation_marks_and_ends_the_span_and_later_outputs_are_dropped())
