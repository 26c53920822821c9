"""The body's sampling controls, echo and prompt_logprobs become exact SamplingParams fields;
what needs the model is a 400 naming the parameter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.engine.tokenizer import Tokenizer
from tandem.gateway import protocol
from tandem.gateway.errors import OpenAIError
from tandem.gateway.protocol import ServedModel


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> ServedModel:
    return ServedModel("tiny", Tokenizer.from_pretrained(tiny_model_dir), vocab_size=512, max_model_len=64, max_n=4)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def refusal(raw: bytes, chat: bool, served: ServedModel) -> tuple[int, str | None, str]:
    with pytest.raises(OpenAIError) as info:
        protocol.prepare(raw, chat, served)
    error = info.value.body()["error"]
    return info.value.status_code, error["param"], error["message"]


def test_controls_reach_the_sampling_params(served: ServedModel) -> None:
    raw = body(
        prompt="Hello",
        max_tokens=8,
        presence_penalty=0.5,
        frequency_penalty=-1.5,
        repetition_penalty=1.2,
        logit_bias={"17": 5, "3": -100},
        min_tokens=2,
        bad_words=["hello", " world"],
        prompt_logprobs=3,
    )
    (choice,) = protocol.prepare(raw, False, served).choices
    p = choice.sampling
    tok = served.tokenizer
    expected_words = []
    for word in ("hello", "world"):
        plain, spaced = tok.encode(word, add_special_tokens=False), tok.encode(" " + word, add_special_tokens=False)
        expected_words.append(tuple(plain))
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            expected_words.append(tuple(spaced))
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.5, 1.2)
    assert p.logit_bias == ((3, -100.0), (17, 5.0))
    assert (p.min_tokens, p.prompt_logprobs, p.max_tokens) == (2, 3, 8)
    assert p.bad_words_token_ids == tuple(expected_words)
    assert len(expected_words) >= 2


def test_chat_takes_the_same_controls(served: ServedModel) -> None:
    raw = body(messages=[{"role": "user", "content": "hi"}], max_tokens=4, presence_penalty=1, prompt_logprobs=0)
    (choice,) = protocol.prepare(raw, True, served).choices
    assert (choice.sampling.presence_penalty, choice.sampling.prompt_logprobs) == (1, 0)


def test_echo_with_max_tokens_0_is_the_prompt_alone(served: ServedModel) -> None:
    (choice,) = protocol.prepare(body(prompt="Hello", echo=True, max_tokens=0, logprobs=2), False, served).choices
    assert (choice.sampling.max_tokens, choice.sampling.prompt_logprobs, choice.sampling.logprobs) == (0, 2, 2)
    (plain,) = protocol.prepare(body(prompt="Hello", echo=True, max_tokens=0), False, served).choices
    assert (plain.sampling.max_tokens, plain.sampling.prompt_logprobs) == (0, None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (body(prompt="Hello", max_tokens=0), (400, "max_tokens", "max_tokens must be at least 1, got 0.")),
        (
            body(prompt="Hello", max_tokens=2, min_tokens=3),
            (400, "min_tokens", "min_tokens must be less than or equal to max_tokens=2, got 3."),
        ),
        (
            body(prompt="Hello", logit_bias={"512": 1, "7": 2}),
            (
                400,
                "logit_bias",
                "token_id(s) [512] in logit_bias contain out-of-vocab token ids. Vocabulary size: 512",
            ),
        ),
        (body(prompt="Hello", logit_bias={"07": 1, "7": 2}), (400, "logit_bias", "logit_bias names a token id twice.")),
    ],
)
def test_model_dependent_refusals(served: ServedModel, raw: bytes, expected: tuple) -> None:
    assert refusal(raw, False, served) == expected
