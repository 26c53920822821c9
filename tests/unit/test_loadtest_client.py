"""loadtest client: the request body, one arrival per output chunk, usage counts, and every
error kind, against an in-process mock transport and a fake clock (exact times)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable

import httpx2
import pytest

from tandem.loadtest.client import ClientConfig, Endpoint, StreamingClient, request_body, sse_lines
from tandem.loadtest.record import ErrorKind, RequestRecord
from tandem.loadtest.request import ChatMessage, Role, WorkloadRequest

REQUEST = WorkloadRequest("req-0", (5, 6, 7), max_tokens=3)


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def token_chunk(text: str, token_id: int) -> dict:
    return {"choices": [{"index": 0, "text": text, "token_ids": [token_id], "finish_reason": None}]}


FINISH = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}


def run(
    handler: Callable,
    request: WorkloadRequest = REQUEST,
    timeout_s: float = 5.0,
    endpoint: Endpoint = Endpoint.COMPLETIONS,
) -> RequestRecord:
    clock = itertools.count(0.0, 0.25).__next__  # every clock read advances 0.25 s
    config = ClientConfig("http://test", "tiny", endpoint=endpoint, timeout_s=timeout_s)

    async def main() -> RequestRecord:
        async with StreamingClient(config, clock=clock, transport=httpx2.MockTransport(handler)) as client:
            return await client.send(request)

    return asyncio.run(main())


def test_success_records_one_arrival_per_token_chunk() -> None:
    seen: list[dict] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        assert request.url.path == "/v1/completions"
        body = sse(token_chunk("a", 10), token_chunk("", 11), token_chunk("c", 12), FINISH, USAGE, b"[DONE]")
        return httpx2.Response(200, content=body)

    record = run(handler)
    assert seen == [
        {
            "model": "tiny",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "return_token_ids": True,
            "prompt": [5, 6, 7],
        }
    ]
    # Clock reads: start 0, chunks 0.25 / 0.5 / 0.75, finish 1.0, usage 1.25, end 1.5.
    assert record == RequestRecord(
        request_id="req-0",
        start_s=0.0,
        end_s=1.5,
        token_times_s=(0.25, 0.5, 0.75),
        prompt_tokens=3,
        output_tokens=3,
        error=None,
        http_status=200,
    )


def test_usage_cached_tokens_are_recorded() -> None:
    usage = {
        "choices": [],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "total_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=sse(token_chunk("a", 10), usage, b"[DONE]"))

    record = run(handler)
    assert (record.error, record.cached_tokens, record.prompt_tokens) == (None, 2, 3)
    assert RequestRecord.from_dict(record.to_dict()) == record


def test_cached_tokens_beyond_the_prompt_are_a_stream_error() -> None:
    usage = {
        "choices": [],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "total_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=sse(token_chunk("a", 10), usage, b"[DONE]"))

    record = run(handler)
    assert record.error is ErrorKind.STREAM_ERROR
    assert record.error_message == "usage reports cached_tokens=4 of 3 prompt tokens"
    assert record.cached_tokens is None


def test_chat_body_renders_the_conversation() -> None:
    request = WorkloadRequest(
        "c",
        (1, 2, 3),
        2,
        conversation_id=0,
        turn=1,
        messages=(ChatMessage(Role.USER, (1,)), ChatMessage(Role.ASSISTANT, (2,)), ChatMessage(Role.USER, (3,))),
    )
    body = request_body(ClientConfig("http://x", "m", endpoint=Endpoint.CHAT), request)
    assert body["messages"] == [
        {"role": "user", "content": "w1"},
        {"role": "assistant", "content": "w2"},
        {"role": "user", "content": "w3"},
    ]
    assert "prompt" not in body
    plain = request_body(ClientConfig("http://x", "m", endpoint=Endpoint.CHAT), REQUEST)
    assert plain["messages"] == [{"role": "user", "content": "w5 w6 w7"}]


def test_chat_stream_counts_content_deltas() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/chat/completions"
        role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        text = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
        return httpx2.Response(200, content=sse(role, text, text, USAGE, b"[DONE]"))

    record = run(handler, endpoint=Endpoint.CHAT)
    assert (record.ok, record.token_times_s, record.output_tokens) == (True, (0.5, 0.75), 3)


@pytest.mark.parametrize(
    ("status", "kind"), [(400, ErrorKind.HTTP_4XX), (429, ErrorKind.HTTP_4XX), (503, ErrorKind.HTTP_5XX)]
)
def test_http_errors(status: int, kind: ErrorKind) -> None:
    record = run(lambda request: httpx2.Response(status, json={"error": {"message": "nope"}}))
    assert (record.error, record.http_status, record.token_times_s, record.output_tokens) == (kind, status, (), 0)
    assert record.error_message.startswith(f"HTTP {status}: ") and "nope" in record.error_message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (sse(token_chunk("a", 1), {"error": {"message": "decode worker died"}}, b"[DONE]"), "decode worker died"),
        (sse(token_chunk("a", 1)), "without [DONE]"),
        (sse(b"{not json"), "not JSON"),
    ],
)
def test_stream_errors(body: bytes, message: str) -> None:
    record = run(lambda request: httpx2.Response(200, content=body))
    assert (record.error, record.http_status) == (ErrorKind.STREAM_ERROR, 200)
    assert message in record.error_message


def test_connection_error() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    record = run(handler)
    assert (record.error, record.http_status, record.start_s, record.end_s) == (ErrorKind.CONNECTION, None, 0.0, 0.25)


def test_transport_timeout() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("read timed out", request=request)

    assert run(handler).error is ErrorKind.TIMEOUT


def test_overall_timeout_bounds_a_stalled_request() -> None:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        await asyncio.sleep(30)
        return httpx2.Response(200)

    record = run(handler, timeout_s=0.05)
    assert record.error is ErrorKind.TIMEOUT and "0.05 s" in record.error_message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "localhost:8000"}, "must start with http"),
        ({"model": ""}, "non-empty model name"),
        ({"timeout_s": 0.0}, "positive number of seconds"),
        ({"max_connections": 0}, "max_connections must be >= 1"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientConfig(**{"base_url": "http://x", "model": "m", **kwargs})


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        (["data: a\n\ndata: b\n\n"], ["data: a", "", "data: b", ""]),
        (["data: a\r", "\ndata: b\r\n"], ["data: a", "data: b"]),  # CRLF split across chunks
        (["data: a\r", "data: b"], ["data: a", "data: b"]),  # a lone CR ends a line; no final newline
        (["da", "ta: a\rdata: b\r"], ["data: a", "data: b"]),
        (['data: {"t":"x\u2028y\x85z\u2029"}\n'], ['data: {"t":"x\u2028y\x85z\u2029"}']),  # not line ends in SSE
    ],
)
def test_sse_lines_split_only_at_cr_and_lf(chunks: list[str], lines: list[str]) -> None:
    async def source():
        for chunk in chunks:
            yield chunk

    async def collect() -> list[str]:
        return [line async for line in sse_lines(source())]

    assert asyncio.run(collect()) == lines


def test_a_raw_line_separator_inside_the_json_does_not_break_the_stream() -> None:
    chunk = b'data: {"choices":[{"index":0,"text":"a\xe2\x80\xa8b","token_ids":[10]}]}\n\n'  # raw U+2028

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=chunk + sse(USAGE, b"[DONE]"))

    record = run(handler)
    assert (record.error, record.output_tokens, len(record.token_times_s)) == (None, 3, 1)
