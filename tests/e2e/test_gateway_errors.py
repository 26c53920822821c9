"""Bad input at the gateway, as a table: each gets its status and OpenAI error shape, and the
next valid request still succeeds. Also 429 (token bucket in Redis) and 503 (no worker)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest

from tandem.common.embedded_redis import EmbeddedRedis
from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster, start_gateway

KEY = "sk-tandem-test"
MAX_BODY = 65536
MAX_N = 4


def post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, dict]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, resp.headers, json.loads(raw) if raw else {}  # headers: case-insensitive
    finally:
        conn.close()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def guarded(cluster: Cluster, tiny_model_dir) -> Iterator[tuple[ChildProcess, str]]:
    g = cluster.gateway("--api-key", KEY, "--max-body-bytes", str(MAX_BODY), "--max-n", str(MAX_N))
    try:
        yield g, tiny_model_dir.name
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


def _valid(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "ok", "max_tokens": 3, "temperature": 0}).encode()


def _case(model: str, **overrides) -> bytes:
    body = {"model": model, "prompt": "hello", "max_tokens": 4}
    body.update(overrides)
    return json.dumps(body).encode()


CASES = [
    # (name, body(model) -> bytes, headers, status, type, param, code, message fragment)
    (
        "malformed_json",
        lambda m: b'{"model": "x", "prompt": ',
        auth(),
        400,
        "invalid_request_error",
        None,
        None,
        "not valid JSON",
    ),
    (
        "invalid_utf8",
        lambda m: b'{"model": "' + m.encode() + b'", "prompt": "\xff\xfe"}',
        auth(),
        400,
        "invalid_request_error",
        None,
        None,
        "UTF-8",
    ),
    ("not_an_object", lambda m: b"[1, 2]", auth(), 400, "invalid_request_error", None, None, "object"),
    (
        "max_tokens_zero",
        lambda m: _case(m, max_tokens=0),
        auth(),
        400,
        "invalid_request_error",
        "max_tokens",
        None,
        "max_tokens",
    ),
    (
        "max_tokens_negative",
        lambda m: _case(m, max_tokens=-5),
        auth(),
        400,
        "invalid_request_error",
        "max_tokens",
        None,
        "max_tokens",
    ),
    ("n_over_cap", lambda m: _case(m, n=MAX_N + 1), auth(), 400, "invalid_request_error", "n", None, "n"),
    (
        "nan_temperature",
        lambda m: _case(m).replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": NaN'),
        auth(),
        400,
        "invalid_request_error",
        "temperature",
        None,
        "temperature",
    ),
    (
        "token_id_out_of_range",
        lambda m: _case(m, prompt=[1, 2, 99999]),
        auth(),
        400,
        "invalid_request_error",
        "prompt",
        None,
        "99999",
    ),
    (
        "unknown_model",
        lambda m: _case("no-such-model"),
        auth(),
        404,
        "invalid_request_error",
        "model",
        "model_not_found",
        "The model `no-such-model` does not exist.",
    ),
    (
        "prompt_over_context",
        lambda m: _case(m, prompt=[5] * 2048),
        auth(),
        400,
        "invalid_request_error",
        "prompt",
        "context_length_exceeded",
        "This model's maximum context length is 2048 tokens. However, your request has 2048 input tokens.",
    ),
    (
        "prompt_plus_completion_over_context",
        lambda m: _case(m, prompt=[5] * 2000, max_tokens=100),
        auth(),
        400,
        "invalid_request_error",
        "max_tokens",
        "context_length_exceeded",
        "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (2000 in the prompt, 100 in the completion).",  # noqa: E501
    ),
    (
        "body_over_limit",
        lambda m: _case(m, prompt="a" * MAX_BODY),
        auth(),
        413,
        "invalid_request_error",
        None,
        "request_too_large",
        f"the limit is {MAX_BODY} bytes",
    ),
    (
        "missing_key",
        lambda m: _valid(m),
        {},
        401,
        "authentication_error",
        None,
        "invalid_api_key",
        "You didn't provide an API key",
    ),
    (
        "wrong_key",
        lambda m: _valid(m),
        auth("sk-wrong"),
        401,
        "authentication_error",
        None,
        "invalid_api_key",
        "Incorrect API key provided.",
    ),
]


@pytest.mark.parametrize("name,body,headers,status,type_,param,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(guarded, cluster: Cluster, name, body, headers, status, type_, param, code, fragment) -> None:
    gateway, model = guarded
    got_status, _, got = post(gateway.address, "/v1/completions", body(model), headers)
    assert got_status == status, got
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["type"] == type_
    assert got["error"]["param"] == param
    if code is not None:
        assert got["error"]["code"] == code
    assert fragment in got["error"]["message"]
    ok_status, _, ok = post(gateway.address, "/v1/completions", _valid(model), auth())
    assert ok_status == 200, ok
    assert ok["choices"][0]["finish_reason"] in ("stop", "length")
    cluster.assert_drained()


def test_chat_errors(guarded) -> None:
    gateway, model = guarded
    status, _, got = post(
        gateway.address, "/v1/chat/completions", json.dumps({"model": model, "messages": []}).encode(), auth()
    )
    assert status == 400 and got["error"]["param"] == "messages"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    }
    status, _, got = post(gateway.address, "/v1/chat/completions", json.dumps(body).encode(), auth())
    assert status == 400 and "image_url" in got["error"]["message"]
    status, _, got = post(gateway.address, "/v1/nope", b"{}", auth())
    assert status == 404 and set(got["error"]) == {"message", "type", "param", "code"}


def test_rate_limit_429_with_retry_after(cluster: Cluster) -> None:
    g = cluster.gateway("--rate-limit-rpm", "2", "--cluster", "default")
    try:
        model = cluster.model_dir.name
        statuses = [post(g.address, "/v1/completions", _valid(model))[0] for _ in range(2)]
        assert statuses == [200, 200]
        status, headers, got = post(g.address, "/v1/completions", _valid(model))
        assert status == 429
        assert got["error"]["type"] == "rate_limit_exceeded"
        assert 1 <= int(headers["Retry-After"]) <= 30
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


def test_no_worker_503_with_retry_after(tiny_model_dir) -> None:
    empty = EmbeddedRedis.start()
    g = start_gateway(tiny_model_dir, empty.url, wait_ready=False)
    try:
        u = urlparse(g.address)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 503 and resp.getheader("Retry-After") == "1"
        conn.close()
        for stream in (False, True):
            body = json.dumps(
                {"model": tiny_model_dir.name, "prompt": "hi", "max_tokens": 2, "stream": stream}
            ).encode()
            status, headers, got = post(g.address, "/v1/completions", body)
            assert status == 503
            assert headers["Retry-After"] == "1"
            assert got["error"]["type"] == "service_unavailable"
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)
        empty.stop()
