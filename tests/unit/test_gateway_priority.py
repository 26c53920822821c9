"""The request's priority reaches the workers: every choice's `Request` carries it, and a
migration's replay keeps it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from tandem.common.request import FinishReason, Request, SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.generation import ChoiceSpec, Generation
from tandem.gateway.metrics import GatewayMetrics, MigrationReason
from tandem.gateway.migration import DecodeFailure, Resume
from tandem.gateway.pipeline import Delta


class _RecordingPipeline:
    def __init__(self) -> None:
        self.requests: list[Request] = []

    async def generate(self, request: Request, parent: object = None, session: object = None) -> AsyncIterator[Delta]:
        self.requests.append(request)
        yield Delta((7,), (), FinishReason.LENGTH)


def test_every_choice_request_carries_the_priority(tiny_model_dir: Path) -> None:
    pipeline = _RecordingPipeline()
    params = SamplingParams(max_tokens=1, temperature=0.0)
    choices = [ChoiceSpec(0, (5, 6), params), ChoiceSpec(1, (5, 6), params)]
    generation = Generation(
        pipeline,  # type: ignore[arg-type]
        Tokenizer.from_pretrained(tiny_model_dir),
        GatewayMetrics("m"),
        "cmpl-p",
        choices,
        (),
        None,
        None,
        priority=3,
    )

    async def drain() -> list[int]:
        return [event.index async for event in generation.events()]

    assert sorted(asyncio.run(drain())) == [0, 1]
    assert sorted((r.request_id, r.priority) for r in pipeline.requests) == [("cmpl-p-0", 3), ("cmpl-p-1", 3)]


def test_a_replay_keeps_the_priority() -> None:
    request = Request("cmpl-1-0", (5, 6, 7), SamplingParams(max_tokens=4), "tenant", priority=-2)
    resume = Resume(request, max_migrations=1)
    resume.sent(Delta((9,), (), None))
    replay = resume.resume(DecodeFailure("gone", "decode-0", MigrationReason.WORKER_FAILED))
    assert (replay.request_id, replay.prompt_token_ids, replay.priority) == ("cmpl-1-0.m1", (5, 6, 7, 9), -2)
    # the sent token is generated output of the replay (num_generated), so max_tokens stays
    assert (replay.sampling.max_tokens, replay.cache_salt, replay.num_generated) == (4, "tenant", 1)
