"""tandem.gateway.protocol.prepare / tokenize_body / detokenize_body: a raw body in, exact results out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.common.request import SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway import protocol
from tandem.gateway.bodies import ChatCompletionRequest
from tandem.gateway.errors import OpenAIError
from tandem.gateway.generation import ChoiceSpec
from tandem.gateway.protocol import ServedModel

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> ServedModel:
    return ServedModel("tiny", Tokenizer.from_pretrained(tiny_model_dir), vocab_size=512, max_model_len=64, max_n=4)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def refusal(raw: bytes, chat: bool, served: ServedModel) -> dict[str, Any]:
    with pytest.raises(OpenAIError) as info:
        protocol.prepare(raw, chat, served)
    return {"status": info.value.status_code, **info.value.body()["error"]}


def test_completions_prompts_times_n(served: ServedModel) -> None:
    raw = body(prompt=["Hello", "Hi"], n=2, max_tokens=5, seed=10, stop="\n", logprobs=2, model="tiny")
    prepared = protocol.prepare(raw, False, served)
    hello, hi = (0, 433, 274, 82), (0, 43, 76)
    assert prepared.chat is False
    assert prepared.prompts == (hello, hi)

    def sampling(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=5, temperature=1.0, top_k=None, top_p=1.0, seed=seed, logprobs=2)

    assert prepared.choices == (
        ChoiceSpec(0, hello, sampling(10)),
        ChoiceSpec(1, hello, sampling(11)),
        ChoiceSpec(2, hi, sampling(10)),
        ChoiceSpec(3, hi, sampling(11)),
    )
    assert (prepared.stop, prepared.logprob_count) == (("\n",), 2)
    assert (prepared.num_prompt_tokens, prepared.num_charged_tokens) == (7, 2 * (4 + 5) + 2 * (3 + 5))


def test_completions_without_max_tokens_take_what_each_prompt_leaves(served: ServedModel) -> None:
    prepared = protocol.prepare(body(prompt=[[1] * 60, [2] * 10], max_tokens=None), False, served)
    assert [c.sampling.max_tokens for c in prepared.choices] == [4, 54]
    assert prepared.logprob_count is None


def test_chat_renders_the_template_and_reads_chat_logprobs(served: ServedModel) -> None:
    raw = body(messages=USER, max_completion_tokens=3, logprobs=True, top_logprobs=1, stop=["a", "b"])
    prepared = protocol.prepare(raw, True, served)
    chat = protocol.parse_body(raw, ChatCompletionRequest, 4)
    prompt = tuple(protocol.chat_prompt(chat, served.tokenizer))
    assert prepared.chat is True
    assert prepared.prompts == (prompt,)
    assert prepared.choices == (ChoiceSpec(0, prompt, protocol.to_sampling(chat, 3, 0)),)
    assert prepared.choices[0].sampling.logprobs == 1
    assert (prepared.stop, prepared.logprob_count) == (("a", "b"), 1)


def test_chat_context_errors_name_the_parameter_given(served: ServedModel) -> None:
    with_completion_tokens = refusal(body(messages=USER, max_completion_tokens=60), True, served)
    assert (with_completion_tokens["status"], with_completion_tokens["param"]) == (400, "max_completion_tokens")
    assert with_completion_tokens["code"] == "context_length_exceeded"
    assert refusal(body(messages=USER, max_tokens=60), True, served)["param"] == "max_tokens"


def test_checks_run_in_order_body_then_model_then_prompt(served: ServedModel) -> None:
    not_found = {
        "status": 404,
        "message": "The model `other` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert refusal(body(prompt=[600], model="other"), False, served) == not_found  # before the vocabulary check
    assert refusal(body(messages=USER, model="other"), True, served) == not_found
    assert refusal(body(prompt="x", n=9, model="other"), False, served) == {
        "status": 400,
        "message": "n must be at most 4, got 9.",
        "type": "invalid_request_error",
        "param": "n",
        "code": None,
    }
    assert (
        refusal(body(prompt=[600]), False, served)["message"] == "Token id 600 is out of vocabulary (vocab size 512)."
    )


def test_tokenize_and_detokenize_bodies(served: ServedModel) -> None:
    assert protocol.tokenize_body(body(prompt="Hello"), served) == [0, 433, 274, 82]
    assert protocol.tokenize_body(body(prompt="Hello", add_special_tokens=False), served) == [433, 274, 82]
    assert protocol.detokenize_body(body(tokens=[0, 433, 274, 82]), served) == "<|bos|>Hello"
    with pytest.raises(OpenAIError) as info:
        protocol.detokenize_body(body(tokens=[512]), served)
    assert (info.value.status_code, info.value.param) == (400, "tokens")
    with pytest.raises(OpenAIError) as info:
        protocol.tokenize_body(body(prompt="x", model="other"), served)
    assert (info.value.status_code, info.value.param) == (404, "model")
