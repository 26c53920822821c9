"""tandem.gateway.protocol: body parsing, validation errors, prompts, length limits, sampling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tandem.common.request import SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway import protocol
from tandem.gateway.bodies import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tandem.gateway.errors import OpenAIError
from tandem.gateway.protocol import parse_body

MAX_N = 4
COMP, CHAT = CompletionRequest, ChatCompletionRequest
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def refusal(raw: bytes, model_cls: type) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse_body(raw, model_cls, MAX_N)
    return info.value


# (raw body, request model, param, message substring); every one is a 400 invalid_request_error.
BAD_BODIES = [
    (b"\xff{}", COMP, None, "The request body is not valid UTF-8: invalid start byte at byte 0."),
    (b"{", COMP, None, "The request body is not valid JSON: Expecting property name enclosed"),
    (b"", COMP, None, "The request body is not valid JSON: Expecting value: line 1 column 1"),
    (
        b'{"prompt": "x", "temperature": NaN}',
        COMP,
        "temperature",
        "Invalid value for 'temperature': Input should be a finite number.",
    ),
    (
        b'{"prompt": "x", "top_p": -Infinity}',
        COMP,
        "top_p",
        "Invalid value for 'top_p': Input should be a finite number.",
    ),
    (b'{"prompt": NaN}', COMP, "prompt", "Invalid value for 'prompt': prompt must be a string"),
    (b'{"prompt": "x", "unknown": [Infinity]}', COMP, None, "not valid JSON: Infinity is not a valid JSON number."),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"a": NaN}}',
        CHAT,
        None,
        "The request body is not valid JSON: NaN is not a valid JSON number.",
    ),
    (b"[" * 100_000, COMP, None, "not valid JSON: it is nested too deeply."),
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", COMP, None, "not valid JSON: a number has too many digits."),
    (b"[1, 2]", COMP, None, "The request body must be a JSON object, got an array."),
    (b'"hello"', COMP, None, "The request body must be a JSON object, got a string."),
    (b"null", COMP, None, "The request body must be a JSON object, got null."),
    (
        b'{"prompt": "x", "temperature": 1e999}',
        COMP,
        "temperature",
        "Invalid value for 'temperature': Input should be a finite number.",
    ),
    (body(model="m"), COMP, "prompt", "Missing required parameter: 'prompt'."),
    (
        body(prompt="x", max_tokens=-1),
        COMP,
        "max_tokens",
        "Invalid value for 'max_tokens': Input should be greater than or equal to 0.",
    ),
    (body(prompt="x", max_tokens=-5), COMP, "max_tokens", "greater than or equal to 0"),
    (
        body(prompt="x", max_tokens="16"),
        COMP,
        "max_tokens",
        "Invalid type for 'max_tokens': Input should be a valid integer.",
    ),
    (body(prompt="x", max_tokens=16.0), COMP, "max_tokens", "Invalid type for 'max_tokens'"),
    (body(prompt="x", n=5), COMP, "n", "n must be at most 4, got 5."),
    (body(prompt="x", n=0), COMP, "n", "Invalid value for 'n': Input should be greater than or equal to 1."),
    (body(prompt="x", temperature=-0.5), COMP, "temperature", "greater than or equal to 0"),
    (body(prompt="x", temperature="hot"), COMP, "temperature", "Invalid type for 'temperature'"),
    (body(prompt="x", top_p=0), COMP, "top_p", "Input should be greater than 0"),
    (body(prompt="x", top_p=1.5), COMP, "top_p", "Input should be less than or equal to 1"),
    (body(prompt="x", top_k=-2), COMP, "top_k", "greater than or equal to -1"),
    (body(prompt="x", seed=2**63), COMP, "seed", "less than or equal to 9223372036854775807"),
    (body(prompt="x", logprobs=21), COMP, "logprobs", "less than or equal to 20"),
    (body(prompt="x", logprobs=True), COMP, "logprobs", "Invalid type for 'logprobs'"),
    (body(prompt="x", stream="yes"), COMP, "stream", "Invalid type for 'stream': Input should be a valid boolean."),
    (body(prompt="x", suffix="end"), COMP, "suffix", "suffix is not supported."),
    (body(prompt="x", best_of=3), COMP, "best_of", "best_of is not supported; use n."),
    (body(prompt=[]), COMP, "prompt", "Invalid value for 'prompt': prompt must not be empty."),
    (body(prompt=[1, "a"]), COMP, "prompt", "prompt must be a string, a list of strings, a list of token ids"),
    (body(prompt=[True, 2]), COMP, "prompt", "prompt must be a string, a list of strings"),
    (body(prompt=[[1], []]), COMP, "prompt", "prompt token id lists must not be empty"),
    (body(prompt={"text": "x"}), COMP, "prompt", "prompt must be a string"),
    (body(prompt="x", stop=[""]), COMP, "stop", "Invalid value for 'stop': stop strings must not be empty."),
    (body(prompt="x", stop=5), COMP, "stop", "stop must be a string or a list of strings"),
    (body(prompt="x", stop=["a", 1]), COMP, "stop", "stop must be a string or a list of strings"),
    (body(prompt="x", stop_token_ids=[-1]), COMP, "stop_token_ids[0]", "greater than or equal to 0"),
    (
        body(prompt="x", stream_options={"include_usage": True}),
        COMP,
        "stream_options",
        "stream_options is only allowed when stream is true.",
    ),
    (
        body(prompt="x", stream=True, stream_options={"include_usage": 1}),
        COMP,
        "stream_options.include_usage",
        "Invalid type for 'stream_options.include_usage'",
    ),
    (body(prompt="x", cache_salt=""), COMP, "cache_salt", "cache_salt must be a non-empty string if provided."),
    (body(prompt="x", presence_penalty=2.5), COMP, "presence_penalty", "less than or equal to 2"),
    (body(prompt="x", frequency_penalty=-2.01), COMP, "frequency_penalty", "greater than or equal to -2"),
    (body(prompt="x", repetition_penalty=0), COMP, "repetition_penalty", "greater than 0"),
    (body(prompt="x", logit_bias={"5": 101}), COMP, "logit_bias.5", "Input should be less than or equal to 100"),
    (body(prompt="x", logit_bias={"²": 1}), COMP, "logit_bias", "logit_bias keys must be token ids, got '²'."),
    (body(prompt="x", logit_bias={"a": 1}), COMP, "logit_bias", "logit_bias keys must be token ids, got 'a'."),
    (body(prompt="x", min_tokens=-1), COMP, "min_tokens", "greater than or equal to 0"),
    (body(prompt="x", bad_words="no"), COMP, "bad_words", "Input should be a valid list"),
    (body(prompt="x", prompt_logprobs=21), COMP, "prompt_logprobs", "less than or equal to 20"),
    (
        body(prompt="x", prompt_logprobs=1, stream=True),
        COMP,
        "prompt_logprobs",
        "prompt_logprobs are not available when stream is true.",
    ),
    (body(model="m"), CHAT, "messages", "Missing required parameter: 'messages'."),
    (body(messages=[]), CHAT, "messages", "List should have at least 1 item after validation"),
    (body(messages="hi"), CHAT, "messages", "Invalid type for 'messages'"),
    (
        body(messages=[{"role": "robot", "content": "x"}]),
        CHAT,
        "messages[0].role",
        "Input should be 'system', 'user', 'assistant', 'tool' or 'developer'",
    ),
    (body(messages=[{"content": "x"}]), CHAT, "messages[0].role", "Missing required parameter: 'messages[0].role'."),
    (
        body(messages=[*USER, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
        CHAT,
        "messages[1].content",
        "content part type 'image_url' is not supported; only 'text' parts are",
    ),
    (
        body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        CHAT,
        "messages[0].content",
        "a 'text' content part needs a string 'text'",
    ),
    (
        body(messages=[{"role": "user", "content": ["hi"]}]),
        CHAT,
        "messages[0].content",
        "content parts must be objects",
    ),
    (
        body(messages=[{"role": "user", "content": 5}]),
        CHAT,
        "messages[0].content",
        "content must be a string or a list of content parts",
    ),
    (body(messages=USER, top_logprobs=3), CHAT, "top_logprobs", "top_logprobs requires logprobs to be true."),
    (body(messages=USER, logprobs=True, top_logprobs=21), CHAT, "top_logprobs", "less than or equal to 20"),
    (body(messages=USER, logprobs=2), CHAT, "logprobs", "Invalid type for 'logprobs'"),
    (body(messages=USER, max_completion_tokens=0), CHAT, "max_completion_tokens", "greater than or equal to 1"),
    (body(messages=USER, n=9), CHAT, "n", "n must be at most 4, got 9."),
    (
        body(messages=USER, tools=[{"type": "function"}]),
        CHAT,
        "tools[0].function",
        "Missing required parameter: 'tools[0].function'.",
    ),
    (
        body(messages=USER, response_format={"type": "xml"}),
        CHAT,
        "response_format.type",
        "Invalid value for 'response_format.type': Input should be 'text', 'json_object' or 'json_schema'.",
    ),
    (
        body(messages=USER, chat_template_kwargs={"messages": []}),
        CHAT,
        "chat_template_kwargs",
        "chat_template_kwargs cannot set messages.",
    ),
    (body(prompt="x", messages=USER), TokenizeRequest, "prompt", "Provide exactly one of prompt and messages."),
    (body(model="m"), TokenizeRequest, "prompt", "Provide exactly one of prompt and messages."),
    (body(tokens=[1, -1]), DetokenizeRequest, "tokens[1]", "Invalid value for 'tokens[1]': Input should be greater"),
    (body(tokens="1 2"), DetokenizeRequest, "tokens", "Invalid type for 'tokens'"),
]


@pytest.mark.parametrize(("raw", "model_cls", "param", "message"), BAD_BODIES)
def test_bad_body_is_a_400_naming_the_problem(raw: bytes, model_cls: type, param: str | None, message: str) -> None:
    error = refusal(raw, model_cls)
    assert (error.status_code, error.type, error.param) == (400, "invalid_request_error", param)
    assert message in error.message
    assert error.body() == {
        "error": {"message": error.message, "type": "invalid_request_error", "param": param, "code": None}
    }


def test_n_over_cap_exact_body() -> None:
    error = refusal(body(prompt="x", n=5), CompletionRequest)
    assert error.body() == {
        "error": {"message": "n must be at most 4, got 5.", "type": "invalid_request_error", "param": "n", "code": None}
    }


def test_unknown_fields_are_ignored() -> None:
    req = parse_body(body(prompt="x", user="u-1", foo={"bar": 1}, service_tier="auto"), CompletionRequest, MAX_N)
    assert req.prompt == "x"
    assert not hasattr(req, "foo") and not hasattr(req, "service_tier")
    assert req.user == "u-1"  # OpenAI's end-user id: read (the session key of `--session-key user`)
    chat = parse_body(body(messages=[{"role": "user", "content": "hi", "extra": 1}], metadata={}), CHAT, 1)
    assert chat.messages[0].for_template() == {"role": "user", "content": "hi"}


def test_defaults_and_nulls() -> None:
    req = parse_body(body(prompt="x"), CompletionRequest, MAX_N)
    assert (req.max_tokens, req.n, req.stream, req.echo) == (16, 1, False, False)
    assert (req.logprobs, req.temperature, req.top_p, req.seed) == (None, None, None, None)
    nulls = body(prompt="x", n=None, stream=None, echo=None, max_tokens=None, temperature=None)
    req = parse_body(nulls, CompletionRequest, 1)
    assert (req.max_tokens, req.n, req.stream, req.echo) == (None, 1, False, False)
    chat = parse_body(body(messages=USER, logprobs=None), ChatCompletionRequest, MAX_N)
    assert (chat.max_tokens, chat.max_completion_tokens, chat.logprobs) == (None, None, False)
    assert chat.add_generation_prompt is True
    assert chat.requested_max_tokens is None
    assert parse_body(body(prompt="x", temperature=1), CompletionRequest, 1).temperature == 1.0
    assert parse_body(body(prompt="x", n=4), CompletionRequest, 4).n == 4


def test_max_completion_tokens_wins() -> None:
    chat = parse_body(body(messages=USER, max_tokens=10, max_completion_tokens=20), ChatCompletionRequest, 1)
    assert chat.requested_max_tokens == 20
    assert parse_body(body(messages=USER, max_tokens=10), ChatCompletionRequest, 1).requested_max_tokens == 10


def test_stream_options_include_usage() -> None:
    req = parse_body(body(prompt="x", stream=True, stream_options={"include_usage": True}), CompletionRequest, 1)
    assert req.include_usage is True
    assert parse_body(body(prompt="x", stream=True), CompletionRequest, 1).include_usage is False


def test_prompt_forms(tokenizer: Tokenizer) -> None:
    def inputs(prompt: Any) -> list[list[int]]:
        return protocol.prompt_inputs(parse_body(body(prompt=prompt), CompletionRequest, 1), tokenizer, 512)

    hello = tokenizer.encode("Hello")
    assert hello[0] == 0 and len(hello) > 1  # the post-processor's BOS
    assert inputs("Hello") == [hello]
    assert inputs(["Hello", "Hi"]) == [hello, tokenizer.encode("Hi")]
    assert inputs([5, 6, 511]) == [[5, 6, 511]]
    assert inputs([[5], [6, 7]]) == [[5], [6, 7]]


@pytest.mark.parametrize(("prompt", "bad_id"), [([1, 512], 512), ([[3], [-1]], -1)])
def test_prompt_token_ids_out_of_vocabulary(tokenizer: Tokenizer, prompt: Any, bad_id: int) -> None:
    req = parse_body(body(prompt=prompt), CompletionRequest, 1)
    with pytest.raises(OpenAIError) as info:
        protocol.prompt_inputs(req, tokenizer, 512)
    assert info.value.body() == {
        "error": {
            "message": f"Token id {bad_id} is out of vocabulary (vocab size 512).",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": None,
        }
    }


def test_chat_prompt_renders_template_without_extra_bos(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    req = parse_body(body(messages=messages), ChatCompletionRequest, 1)
    ids = protocol.chat_prompt(req, tokenizer)
    text = "<|bos|><|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids[:2] == [0, 2] and ids.count(0) == 1
    no_prompt = parse_body(body(messages=messages, add_generation_prompt=False), ChatCompletionRequest, 1)
    assert tokenizer.decode(protocol.chat_prompt(no_prompt, tokenizer), skip_special_tokens=False) == text.removesuffix(
        "<|im_start|>assistant\n"
    )


def test_chat_template_failure_is_a_400(tiny_model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    without_template = Tokenizer.from_pretrained(tmp_path)
    req = parse_body(body(messages=USER), ChatCompletionRequest, 1)
    with pytest.raises(OpenAIError) as info:
        protocol.chat_prompt(req, without_template)
    assert (info.value.status_code, info.value.param) == (400, "messages")
    assert info.value.message.startswith(
        "The messages could not be rendered with the chat template: This model has no chat template"
    )


def test_tokenize_request(tokenizer: Tokenizer) -> None:
    prompt = parse_body(body(prompt="Hello"), TokenizeRequest, 1)
    assert protocol.tokenize_request(prompt, tokenizer) == tokenizer.encode("Hello")
    bare = parse_body(body(prompt="Hello", add_special_tokens=False), TokenizeRequest, 1)
    assert protocol.tokenize_request(bare, tokenizer) == tokenizer.encode("Hello", add_special_tokens=False)
    chat = parse_body(body(messages=USER), TokenizeRequest, 1)
    chat_req = parse_body(body(messages=USER), ChatCompletionRequest, 1)
    assert protocol.tokenize_request(chat, tokenizer) == protocol.chat_prompt(chat_req, tokenizer)
    assert parse_body(body(tokens=[1, 2]), DetokenizeRequest, 1).tokens == [1, 2]


def test_check_token_ids() -> None:
    protocol.check_token_ids([0, 511], 512, "tokens")
    cases = (([], "tokens must not be empty."), ([0, 512], "Token id 512 is out of vocabulary (vocab size 512)."))
    for ids, message in cases:
        with pytest.raises(OpenAIError) as info:
            protocol.check_token_ids(ids, 512, "tokens")
        assert (info.value.message, info.value.param) == (message, "tokens")


def test_resolve_max_tokens_wording() -> None:
    assert protocol.resolve_max_tokens(None, 10, 100, "messages") == 90
    assert protocol.resolve_max_tokens(90, 10, 100, "prompt") == 90
    assert protocol.resolve_max_tokens(5, 10, 100, "prompt") == 5
    cases = [
        (
            (None, 100, 100, "messages"),
            "messages",
            "This model's maximum context length is 100 tokens. However, your request has 100 input tokens. "
            "Please reduce the length of the input messages.",
        ),
        (
            (7, 120, 100, "prompt"),
            "prompt",
            "This model's maximum context length is 100 tokens. However, your request has 120 input tokens. "
            "Please reduce the length of the input prompt.",
        ),
        (
            (91, 10, 100, "messages"),
            "max_tokens",
            "This model's maximum context length is 100 tokens. However, you requested 101 tokens (10 in the messages, "
            "91 in the completion). Please reduce the length of the messages or completion.",
        ),
        (
            (95, 10, 100, "prompt"),
            "max_tokens",
            "This model's maximum context length is 100 tokens. However, you requested 105 tokens (10 in the prompt, "
            "95 in the completion). Please reduce the length of the prompt or completion.",
        ),
    ]
    for args, param, message in cases:
        with pytest.raises(OpenAIError) as info:
            protocol.resolve_max_tokens(*args)
        assert info.value.body() == {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": "context_length_exceeded",
            }
        }
    with pytest.raises(OpenAIError) as info:
        protocol.resolve_max_tokens(95, 10, 100, "messages", param="max_completion_tokens")
    assert info.value.param == "max_completion_tokens"


def test_to_sampling_completion() -> None:
    req = parse_body(
        body(
            prompt="x",
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            seed=7,
            stop_token_ids=[9, 11],
            ignore_eos=True,
            logprobs=3,
            n=3,
        ),
        CompletionRequest,
        MAX_N,
    )
    assert [protocol.to_sampling(req, 20, i) for i in range(3)] == [
        SamplingParams(
            max_tokens=20,
            temperature=0.5,
            top_k=40,
            top_p=0.9,
            seed=7 + i,
            stop_token_ids=(9, 11),
            ignore_eos=True,
            logprobs=3,
        )
        for i in range(3)
    ]
    plain = protocol.to_sampling(parse_body(body(prompt="x"), CompletionRequest, 1), 16, 0)
    assert plain == SamplingParams(max_tokens=16, temperature=1.0, top_k=None, top_p=1.0, seed=None, logprobs=None)


@pytest.mark.parametrize(("top_k", "expected"), [(-1, None), (0, None), (None, None), (1, 1), (50, 50)])
def test_to_sampling_top_k(top_k: int | None, expected: int | None) -> None:
    req = parse_body(body(prompt="x", top_k=top_k), CompletionRequest, 1)
    assert protocol.to_sampling(req, 4, 0).top_k == expected


def test_to_sampling_seed_wraps_in_int64() -> None:
    req = parse_body(body(prompt="x", seed=2**63 - 1, n=2), CompletionRequest, 2)
    assert [protocol.to_sampling(req, 4, i).seed for i in range(2)] == [2**63 - 1, -(2**63)]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"logprobs": False}, None),
        ({"logprobs": True}, 0),
        ({"logprobs": True, "top_logprobs": 5}, 5),
        ({"logprobs": False, "top_logprobs": 0}, None),
    ],
)
def test_to_sampling_chat_logprobs(fields: dict[str, Any], expected: int | None) -> None:
    req = parse_body(body(messages=USER, **fields), ChatCompletionRequest, 1)
    assert protocol.to_sampling(req, 8, 0).logprobs == expected


def test_stop_strings() -> None:
    assert protocol.stop_strings(parse_body(body(prompt="x"), CompletionRequest, 1)) == ()
    assert protocol.stop_strings(parse_body(body(prompt="x", stop="\n"), CompletionRequest, 1)) == ("\n",)
    assert protocol.stop_strings(parse_body(body(messages=USER, stop=["a", "bc"]), CHAT, 1)) == ("a", "bc")
