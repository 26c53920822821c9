"""Token-id prompts of /v1/completions: the shape check of `CompletionRequest.prompt` (one pass
over the types, pydantic's union skipped) and `protocol.check_token_ids` (one pass over the
range) accept and refuse exactly what they did with per-item checks, with the same words."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import pytest

from tandem.engine.tokenizer import Tokenizer
from tandem.gateway import protocol
from tandem.gateway.bodies import CompletionRequest
from tandem.gateway.errors import OpenAIError

VOCAB = 512
SHAPE = (
    "Invalid value for 'prompt': prompt must be a string, a list of strings, a list of token ids "
    "or a list of token id lists."
)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> protocol.ServedModel:
    return protocol.ServedModel("tiny", Tokenizer.from_pretrained(tiny_model_dir), VOCAB, max_model_len=128, max_n=4)


def raw(prompt: Any, **fields: Any) -> bytes:
    return json.dumps({"prompt": prompt, "max_tokens": 4, **fields}).encode()


def refusal(body: bytes, served: protocol.ServedModel) -> dict[str, Any]:
    with pytest.raises(OpenAIError) as info:
        protocol.prepare(body, False, served)
    assert info.value.status_code == 400
    return info.value.body()["error"]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([5, 6, 511], ((5, 6, 511),)),
        ([0], ((0,),)),
        ([[5], [6, 7]], ((5,), (6, 7))),
        (list(range(4, 68)), (tuple(range(4, 68)),)),
    ],
)
def test_token_id_prompts_are_prepared_as_sent(served: protocol.ServedModel, prompt: Any, expected: Any) -> None:
    prepared = protocol.prepare(raw(prompt), False, served)
    assert prepared.prompts == expected
    assert [c.prompt_token_ids for c in prepared.choices] == list(expected)
    assert prepared.body.prompt == prompt


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([1, True, 2], SHAPE),  # a bool is not a token id, wherever it is
        ([1, 2, False], SHAPE),
        ([1, 2.0], SHAPE),
        ([1, None], SHAPE),
        ([1, "a"], SHAPE),
        (["a", 1], SHAPE),
        ([[1], 2], SHAPE),
        ([[1], [2, True]], SHAPE),
        ([[1], ["a"]], SHAPE),
        ([[1], {"a": 1}], SHAPE),
        (1, SHAPE),
        ([], "Invalid value for 'prompt': prompt must not be empty."),
        ([[1], []], "Invalid value for 'prompt': prompt token id lists must not be empty."),
    ],
)
def test_malformed_prompts_are_refused_with_the_shape_message(
    served: protocol.ServedModel, prompt: Any, message: str
) -> None:
    assert refusal(raw(prompt), served) == {
        "message": message,
        "type": "invalid_request_error",
        "param": "prompt",
        "code": None,
    }


@pytest.mark.parametrize(
    ("prompt", "bad"),
    [
        ([1, VOCAB], VOCAB),
        ([-1, 1], -1),
        ([3, 700, -5], 700),  # the first id out of range, in order
        ([3, -5, 700], -5),
        ([[3], [4, 2**70]], 2**70),
    ],
)
def test_out_of_vocabulary_ids_name_the_first_one(served: protocol.ServedModel, prompt: Any, bad: int) -> None:
    assert refusal(raw(prompt), served) == {
        "message": f"Token id {bad} is out of vocabulary (vocab size {VOCAB}).",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": None,
    }


def test_a_too_long_token_id_prompt_exceeds_the_context(served: protocol.ServedModel) -> None:
    with pytest.raises(OpenAIError) as info:
        protocol.prepare(raw([7] * 128), False, served)
    assert (info.value.status_code, info.value.param) == (400, "prompt")
    assert info.value.message == (
        "This model's maximum context length is 128 tokens. However, your request has 128 input tokens. "
        "Please reduce the length of the input prompt."
    )


def test_check_token_ids_bounds() -> None:
    protocol.check_token_ids([0, VOCAB - 1], VOCAB, "tokens")
    protocol.check_token_ids((VOCAB - 1,), VOCAB, "tokens")
    cases = (
        ([], "tokens must not be empty."),
        ([VOCAB - 1, VOCAB], f"Token id {VOCAB} is out of vocabulary (vocab size {VOCAB})."),
        ([9, -1, VOCAB], f"Token id -1 is out of vocabulary (vocab size {VOCAB})."),
    )
    for ids, message in cases:
        with pytest.raises(OpenAIError) as info:
            protocol.check_token_ids(ids, VOCAB, "tokens")
        assert (info.value.message, info.value.param) == (message, "tokens")


class Token(enum.IntEnum):
    A = 5


def test_int_subclasses_other_than_bool_are_token_ids_from_python() -> None:
    """A Python caller's int subclass takes the per-item path and is accepted, as before; a bool is not."""
    assert CompletionRequest.model_validate({"prompt": [Token.A, 6]}).prompt == [Token.A, 6]
    assert CompletionRequest.model_validate({"prompt": [[Token.A]]}).prompt == [[Token.A]]
    with pytest.raises(ValueError, match="prompt must be a string, a list of strings"):
        CompletionRequest.model_validate({"prompt": [Token.A, True]})
