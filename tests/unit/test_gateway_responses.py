"""tandem.gateway.responses and errors: exact OpenAI-shaped dicts and SSE bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tandem.common.request import TokenLogprob
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway import errors, responses
from tandem.gateway.response_view import ResponseView
from tandem.gateway.responses import ChoiceResult

H, SPACE, E4, EOS = 75, 224, 164, 1  # tiny tokenizer ids: "h", " ", byte 0xE4 (part of 世), <|eos|>
HEAD = {"request_id": "cmpl-1", "model": "tiny", "created": 1700000000}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    assert [tok.decode([i], skip_special_tokens=False) for i in (H, SPACE, E4, EOS)] == ["h", " ", "\ufffd", "<|eos|>"]
    return tok


LOGPROBS = (TokenLogprob(H, -0.25, ((H, -0.25), (SPACE, -1.5))), TokenLogprob(E4, float("-inf"), ((EOS, -0.5),)))


def test_sse_and_done() -> None:
    assert responses.sse({"a": "é", "b": [1, None]}) == 'data: {"a":"é","b":[1,null]}\n\n'.encode()
    # U+0085, U+2028 and U+2029 end lines for str.splitlines-based readers: escaped, so an
    # event is one line for every client; json.loads reads back the same text.
    event = responses.sse({"text": "a\x85b\u2028c\u2029d\re"})
    assert event == b'data: {"text":"a\\u0085b\\u2028c\\u2029d\\re"}\n\n'
    assert event.decode().splitlines() == [event.decode()[:-2], ""]
    assert json.loads(event[6:]) == {"text": "a\x85b\u2028c\u2029d\re"}
    assert responses.SSE_DONE == b"data: [DONE]\n\n"


def test_usage() -> None:
    assert responses.usage(5, 7) == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert responses.usage(5, 0, cached_tokens=4) == {
        "prompt_tokens": 5,
        "completion_tokens": 0,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_models_response() -> None:
    assert responses.models_response("tiny", 2048, 123) == {
        "object": "list",
        "data": [
            {
                "id": "tiny",
                "object": "model",
                "created": 123,
                "owned_by": "tandem",
                "root": "tiny",
                "max_model_len": 2048,
            }
        ],
    }
    assert responses.models_response("tiny", 64, 1, root="/models/tiny")["data"][0]["root"] == "/models/tiny"


def test_completion_logprobs(tokenizer: Tokenizer) -> None:
    assert responses.completion_logprobs(LOGPROBS, tokenizer, text_offset=10) == {
        "tokens": ["h", "\ufffd"],
        "token_logprobs": [-0.25, -9999.0],
        "top_logprobs": [{"h": -0.25, " ": -1.5}, {"\ufffd": -9999.0, "<|eos|>": -0.5}],
        "text_offset": [10, 11],
    }


def test_chat_logprobs(tokenizer: Tokenizer) -> None:
    assert responses.chat_logprobs(LOGPROBS, tokenizer) == {
        "content": [
            {
                "token": "h",
                "logprob": -0.25,
                "bytes": [104],
                "top_logprobs": [
                    {"token": "h", "logprob": -0.25, "bytes": [104]},
                    {"token": " ", "logprob": -1.5, "bytes": [32]},
                ],
            },
            {
                "token": "\ufffd",
                "logprob": -9999.0,
                "bytes": [0xE4],
                "top_logprobs": [{"token": "<|eos|>", "logprob": -0.5, "bytes": list(b"<|eos|>")}],
            },
        ]
    }


def test_completion_response(tokenizer: Tokenizer) -> None:
    choices = [ChoiceResult(1, "b", (6,), None, "length", (0, 9)), ChoiceResult(0, "a", (5, 6), None, "stop", (0, 8))]
    usage = responses.usage(4, 3)
    assert responses.completion_response(
        **HEAD, choices=choices, usage_body=usage, tokenizer=tokenizer, return_token_ids=False
    ) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "tiny",
        "system_fingerprint": None,
        "choices": [
            {"index": 0, "text": "a", "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "text": "b", "logprobs": None, "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }
    with_ids = responses.completion_response(
        **HEAD, choices=choices, usage_body=usage, tokenizer=tokenizer, return_token_ids=True
    )
    assert with_ids["choices"][0] == {
        "index": 0,
        "text": "a",
        "logprobs": None,
        "finish_reason": "stop",
        "prompt_token_ids": [0, 8],
        "token_ids": [5, 6],
    }


def test_chat_response(tokenizer: Tokenizer) -> None:
    choices = [ChoiceResult(0, "h\ufffd", (H, E4), LOGPROBS, "stop")]
    body = responses.chat_response(
        **{**HEAD, "request_id": "chatcmpl-1"},
        choices=choices,
        usage_body=responses.usage(3, 2),
        tokenizer=tokenizer,
        prompt_token_ids=[0, 7, 8],
    )
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "tiny",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "h\ufffd"},
                "logprobs": responses.chat_logprobs(LOGPROBS, tokenizer),
                "finish_reason": "stop",
                "token_ids": [H, E4],
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "prompt_token_ids": [0, 7, 8],
    }
    plain = responses.chat_response(
        **HEAD,
        choices=[ChoiceResult(0, "x", (5,), None, "length")],
        usage_body=responses.usage(1, 1),
        tokenizer=tokenizer,
    )
    assert "prompt_token_ids" not in plain and plain["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "x"},
        "logprobs": None,
        "finish_reason": "length",
    }


def test_chat_chunks() -> None:
    base = {
        "id": "cmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "tiny",
        "system_fingerprint": None,
    }
    assert responses.chat_chunk(**HEAD, index=0, content="", role=True) == {
        **base,
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ],
    }
    assert responses.chat_chunk(**HEAD, index=2, content="Hi", token_ids=[5]) == {
        **base,
        "choices": [
            {"index": 2, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None, "token_ids": [5]}
        ],
    }
    assert responses.chat_chunk(**HEAD, index=0, content=None, finish_reason="length") == {
        **base,
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
    }
    role = responses.chat_chunk(**HEAD, index=0, content="", role=True, prompt_token_ids=[0, 1])
    assert role["prompt_token_ids"] == [0, 1]


def test_completion_chunk_and_usage_chunk() -> None:
    assert responses.completion_chunk(
        **HEAD, index=1, text="ab", finish_reason="stop", prompt_token_ids=[0], token_ids=[7]
    ) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "tiny",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 1,
                "text": "ab",
                "logprobs": None,
                "finish_reason": "stop",
                "prompt_token_ids": [0],
                "token_ids": [7],
            }
        ],
    }
    assert responses.usage_chunk(**HEAD, chat=True, usage_body=responses.usage(2, 3)) == {
        "id": "cmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "tiny",
        "system_fingerprint": None,
        "choices": [],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
    }


@dataclass(frozen=True)
class Event:
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass
class Totals:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0


def decoded(chunks: list[bytes]) -> list[dict]:
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
    return [json.loads(c[len(b"data: ") :]) for c in chunks]


def test_view_streams_chat(tokenizer: Tokenizer) -> None:
    view = ResponseView("chatcmpl-9", 5, "tiny", True, [[0, 2]], 2, True, None, tokenizer)
    first = decoded(view.stream_chunks(Event(1, "Hi", (H,))))
    assert [c["choices"][0]["delta"] for c in first] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert first[0]["prompt_token_ids"] == [0, 2] and "prompt_token_ids" not in first[1]
    assert first[1]["choices"][0]["token_ids"] == [H]
    held = decoded(view.stream_chunks(Event(1, "", (E4,))))  # text held back, ids still reported
    assert [c["choices"][0]["delta"] for c in held] == [{"content": ""}]
    last = decoded(view.stream_chunks(Event(1, "", (), finish_reason="stop")))
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in last] == [({}, "stop")]


def test_view_streams_chat_without_extras_skips_empty_chunks(tokenizer: Tokenizer) -> None:
    view = ResponseView("chatcmpl-9", 5, "tiny", True, [[0, 2]], 1, None, None, tokenizer)
    assert len(view.stream_chunks(Event(0, "", (E4,)))) == 1  # only the role chunk
    assert view.stream_chunks(Event(0, "", (E4,))) == []
    chunk = decoded(view.stream_chunks(Event(0, "x", (H,), LOGPROBS[:1])))[0]
    assert chunk["choices"][0] == {"index": 0, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}


def test_view_streams_completion_with_logprob_offsets(tokenizer: Tokenizer) -> None:
    view = ResponseView("cmpl-9", 5, "tiny", False, [[0, 5], [0, 6]], 1, True, 1, tokenizer)
    one = decoded(view.stream_chunks(Event(1, "h", (H,), LOGPROBS[:1])))
    assert one[0]["choices"][0] == {
        "index": 1,
        "text": "h",
        "finish_reason": None,
        "prompt_token_ids": [0, 6],
        "token_ids": [H],
        "logprobs": responses.completion_logprobs(LOGPROBS[:1], tokenizer),
    }
    two = decoded(view.stream_chunks(Event(1, "", (E4,), LOGPROBS[1:], "length")))[0]["choices"][0]
    assert "prompt_token_ids" not in two and two["finish_reason"] == "length"
    assert two["logprobs"]["text_offset"] == [1]


def test_view_full_response_and_usage(tokenizer: Tokenizer) -> None:
    view = ResponseView("cmpl-9", 5, "tiny", False, [[0, 5, 6], [0, 7]], 2, False, None, tokenizer)
    totals = {i: Totals([f"t{i}", "!"], [10 + i], [], "stop", cached) for i, cached in enumerate((2, 3, 0, 1))}
    body = view.full_response(totals)
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "t0!"), (1, "t1!"), (2, "t2!"), (3, "t3!")]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 4,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert view.usage_chunk(totals)["usage"] == body["usage"]


# ---- errors ------------------------------------------------------------------------------------


def test_error_bodies_and_headers() -> None:
    BEARER = {"WWW-Authenticate": "Bearer"}
    cases = [
        (errors.bad_request("bad", "n"), 400, "invalid_request_error", "n", None, {}),
        (errors.missing_api_key(), 401, "authentication_error", None, "invalid_api_key", BEARER),
        (errors.invalid_api_key(), 401, "authentication_error", None, "invalid_api_key", BEARER),
        (errors.model_not_found("gpt-9"), 404, "invalid_request_error", "model", "model_not_found", {}),
        (errors.body_too_large(1024), 413, "invalid_request_error", None, "request_too_large", {}),
        (
            errors.rate_limited("slow down", 1.2),
            429,
            "rate_limit_exceeded",
            None,
            "rate_limit_exceeded",
            {"Retry-After": "2"},
        ),
        (
            errors.rate_limited("slow down", 3.0),
            429,
            "rate_limit_exceeded",
            None,
            "rate_limit_exceeded",
            {"Retry-After": "3"},
        ),
        (errors.service_unavailable("busy", 0.01), 503, "service_unavailable", None, None, {"Retry-After": "1"}),
        (errors.internal_error(), 500, "server_error", None, None, {}),
    ]
    for err, status, kind, param, code, headers in cases:
        assert (err.status_code, err.type, err.param, err.code) == (status, kind, param, code)
        assert dict(err.headers) == headers
        assert err.body() == {"error": {"message": err.message, "type": kind, "param": param, "code": code}}
    assert errors.model_not_found("gpt-9").message == "The model `gpt-9` does not exist."
    assert errors.body_too_large(1024).message == "The request body is too large: the limit is 1024 bytes."
    assert errors.invalid_api_key().message == "Incorrect API key provided."
    assert errors.missing_api_key().message.startswith("You didn't provide an API key.")


def test_sse_error_event() -> None:
    event = errors.sse_error_event(errors.internal_error("generation failed: worker died"))
    assert event == (
        b'data: {"error":{"message":"generation failed: worker died","type":"server_error",'
        b'"param":null,"code":null}}\n\n'
    )
