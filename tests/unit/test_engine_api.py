"""The step-level API that workers use: add_request, step, abort; validation of requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine import Engine, FinishReason, SamplingParams
from tests.conftest import random_prompts


@pytest.fixture
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=32, max_model_len=256)


def test_step_api_streams_deltas_and_abort_frees_blocks(engine: Engine) -> None:
    p1, p2 = random_prompts([20, 35], engine.model_config.vocab_size)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request("a", p1, greedy)
    engine.add_request("b", p2, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    streamed: dict[str, list[int]] = {"a": [], "b": []}
    finished: dict[str, FinishReason] = {}
    for _ in range(6):
        for out in engine.step():
            assert len(out.new_token_ids) == 1
            streamed[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished == {"a": FinishReason.LENGTH}
    assert len(streamed["a"]) == 6 and len(streamed["b"]) == 6
    assert streamed["a"] == list(engine.generate([p1], greedy)[0].token_ids)
    assert engine.pool.num_used_blocks == 3  # b: 35 + 6 tokens in 16-token blocks
    assert engine.abort("b") is True
    assert engine.abort("b") is False
    assert engine.step() == []
    engine.check_integrity()
    assert engine.is_drained()
    assert engine.stats.finished == {"length": 2, "abort": 1}


def test_abort_waiting_request(engine: Engine) -> None:
    engine.add_request("w", [1, 2, 3], SamplingParams())
    assert engine.abort("w") is True
    engine.check_integrity()
    assert engine.is_drained()


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt must contain at least one token"),
        ([1, 10**6], SamplingParams(), "prompt token id 1000000 is out of range"),
        ([-1], SamplingParams(), "prompt token id -1 is out of range"),
        ([1] * 256, SamplingParams(), "the maximum context length is 256 tokens"),
    ],
)
def test_bad_requests(engine: Engine, prompt: list[int], params: SamplingParams, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.add_request("x", prompt, params)
    engine.add_request("ok", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="request id 'ok' is already active"):
        engine.add_request("ok", [1, 2], SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    assert engine.is_drained()


def test_request_larger_than_the_pool_is_refused(tiny_model_dir: Path) -> None:
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=8)
    with pytest.raises(ValueError, match="needs up to 13 KV blocks but the pool has 8"):
        engine.add_request("big", [1] * 190, SamplingParams(max_tokens=10))
    assert engine.is_drained()
