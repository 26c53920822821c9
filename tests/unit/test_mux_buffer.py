"""A request's buffer on the gateway's multiplexed decode stream (gateway/mux.py `RequestStream`):
bounded in messages, merging outputs into the last message while full, and giving up only
once it has stayed full for its timeout."""

from __future__ import annotations

import asyncio

from tandem.common.codec import DecodeDelta
from tandem.common.mux_codec import MuxOutput
from tandem.common.request import FinishReason, TokenLogprob
from tandem.gateway.mux import RequestStream


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _out(*tokens: int, finish: FinishReason | None = None, failed: bool = False) -> MuxOutput:
    logprobs = tuple(TokenLogprob(t, -float(t)) for t in tokens)
    return MuxOutput("r", DecodeDelta(tuple(tokens), logprobs, finish, failed))


def _drain(stream: RequestStream) -> list[DecodeDelta]:
    async def run() -> list[DecodeDelta]:
        return [await stream.get(1.0) for _ in range(len(stream))]

    return asyncio.run(run())


def test_a_full_buffer_merges_into_its_last_message_then_gives_up_after_the_timeout() -> None:
    clock = Clock()
    stream = RequestStream("r", max_buffered=2, full_timeout_s=1.0, clock=clock)
    assert stream.push(_out(1)) and stream.push(_out(2))
    assert stream.push(_out(3))  # full since now: merged into the last message
    clock.now += 0.99
    assert stream.push(_out(4, 5))
    assert len(stream) == 2
    clock.now += 0.01  # full for 1.0 s
    assert not stream.push(_out(6))
    got = _drain(stream)
    assert [d.token_ids for d in got] == [(1,), (2, 3, 4, 5)]
    assert [lp.token_id for lp in got[1].logprobs] == [2, 3, 4, 5]
    assert not stream.finished


def test_reading_resets_the_full_timer() -> None:
    clock = Clock()
    stream = RequestStream("r", max_buffered=1, full_timeout_s=1.0, clock=clock)
    assert stream.push(_out(1)) and stream.push(_out(2))  # full from now
    clock.now += 0.9
    assert [d.token_ids for d in _drain(stream)] == [(1, 2)]
    assert stream.push(_out(3)) and stream.push(_out(4))  # full again, from now
    clock.now += 0.9
    assert stream.push(_out(5))
    assert [d.token_ids for d in _drain(stream)] == [(3, 4, 5)]


def test_the_final_delta_merges_and_ends_the_request_and_a_failure_gets_its_own_message() -> None:
    clock = Clock()
    stream = RequestStream("r", max_buffered=1, full_timeout_s=1.0, clock=clock)
    assert stream.push(_out(1)) and stream.push(_out(2, finish=FinishReason.LENGTH))
    assert stream.finished
    [last] = _drain(stream)
    assert last.token_ids == (1, 2) and last.finish_reason is FinishReason.LENGTH

    failing = RequestStream("r", max_buffered=1, full_timeout_s=1.0, clock=clock)
    assert failing.push(_out(1)) and failing.push(_out(failed=True))
    assert failing.finished
    assert [(d.token_ids, d.failed) for d in _drain(failing)] == [((1,), False), ((), True)]
