"""A choice whose setup fails (before it handles its own stream's errors) ends the request
with that error: `Generation.events()` re-raises it and never waits for the choice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tandem.common.request import SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.generation import ChoiceSpec, Generation
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.pipeline import Delta


class _BrokenPipeline:
    def generate(self, request: object, parent: object = None, session: object = None) -> AsyncIterator[Delta]:
        raise TypeError(f"cannot route {request.request_id}")  # type: ignore[attr-defined]


def test_a_choice_that_fails_before_its_stream_fails_the_request(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    specs = [ChoiceSpec(i, (5, 6), SamplingParams(max_tokens=4, temperature=0.0)) for i in range(2)]
    generation = Generation(
        _BrokenPipeline(),  # type: ignore[arg-type]
        tokenizer,
        GatewayMetrics("m"),
        "cmpl-x",
        specs,
        (),
        None,
        None,
    )

    async def drain() -> list[object]:
        async with asyncio.timeout(10):
            return [e async for e in generation.events()]

    with pytest.raises(TypeError, match="cannot route cmpl-x-0"):
        asyncio.run(drain())
