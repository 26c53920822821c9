"""Sampling: seeded reproducibility independent of the batch, filters, stops, logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.engine import Engine, FinishReason, SamplingParams
from tandem.engine.sampler import Sampler
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=128)


@pytest.fixture(scope="module")
def prompts(engine: Engine) -> list[list[int]]:
    return random_prompts([5, 23, 40, 9, 64], engine.model_config.vocab_size, seed=7)


def test_seeded_sampling_is_independent_of_the_batch(engine: Engine, prompts: list[list[int]]) -> None:
    seeded = SamplingParams(max_tokens=24, temperature=1.3, top_p=0.95, seed=1234, ignore_eos=True)
    alone = engine.generate([prompts[0]], seeded)[0].token_ids
    others = [
        SamplingParams(max_tokens=30, temperature=0.9, ignore_eos=True),  # unseeded
        SamplingParams(max_tokens=10, temperature=0.0),
        SamplingParams(max_tokens=17, temperature=2.0, top_k=5, seed=99, ignore_eos=True),
    ]
    batch = engine.generate([prompts[1], prompts[2], prompts[0], prompts[3]], [others[0], others[1], seeded, others[2]])
    assert batch[2].token_ids == alone
    # the same request again after other traffic, and twice in one batch
    twice = engine.generate([prompts[0], prompts[0]], seeded)
    assert twice[0].token_ids == alone and twice[1].token_ids == alone
    different = engine.generate(
        [prompts[0]], SamplingParams(max_tokens=24, temperature=1.3, top_p=0.95, seed=4321, ignore_eos=True)
    )
    assert different[0].token_ids != alone
    assert engine.is_drained()


def test_filters_that_leave_one_token_are_greedy(engine: Engine, prompts: list[list[int]]) -> None:
    greedy = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    top_k_1 = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=5.0, top_k=1, ignore_eos=True))
    top_p_tiny = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=5.0, top_p=1e-6, ignore_eos=True))
    assert [o.token_ids for o in top_k_1] == [o.token_ids for o in greedy]
    assert [o.token_ids for o in top_p_tiny] == [o.token_ids for o in greedy]


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 0.5]])
    sampler = Sampler(seed=0)
    params = SamplingParams(temperature=10.0, top_k=2, seed=5)
    drawn = {sampler.sample(logits, [params], [pos])[0][0] for pos in range(300)}
    assert drawn == {1, 3}
    params = SamplingParams(temperature=10.0, top_p=0.5, seed=5)  # flat at T=10: needs 3 tokens
    drawn = {sampler.sample(logits, [params], [pos])[0][0] for pos in range(300)}
    assert drawn == {1, 2, 3}


def test_stop_token_max_tokens_and_logprobs(engine: Engine, prompts: list[list[int]]) -> None:
    greedy = engine.generate([prompts[1]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert len(greedy.token_ids) == 10 and greedy.finish_reason is FinishReason.LENGTH
    stop_at = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_at)
    stopped = engine.generate([prompts[1]], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_at,)))[
        0
    ]
    assert stopped.token_ids == greedy.token_ids[: first + 1] and stopped.finish_reason is FinishReason.STOP
    with_lp = engine.generate([prompts[1]], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))[0]
    assert with_lp.logprobs is not None and len(with_lp.logprobs) == 4
    for token, lp in zip(with_lp.token_ids, with_lp.logprobs):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][0] == token and lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    # logprobs equal log_softmax of the model's logits at that position
    ref = engine.generate([prompts[1]], SamplingParams(max_tokens=1, temperature=0.0, return_prompt_logits=True))
    scoring = engine.generate(
        [prompts[1] + [with_lp.token_ids[0]]], SamplingParams(max_tokens=1, return_prompt_logits=True)
    )
    last = torch.log_softmax(scoring[0].prompt_logits[len(prompts[1]) - 1], dim=-1)
    assert with_lp.logprobs[0].logprob == pytest.approx(float(last[with_lp.token_ids[0]]), abs=1e-5)
    assert ref[0].token_ids[0] == with_lp.token_ids[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": -1}, "max_tokens must be an integer >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": 0}, "top_k must be None or an integer >= 1"),
        ({"logprobs": 21}, "logprobs must be None or an integer in"),
    ],
)
def test_invalid_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
