"""The generation endpoints' direct ASGI path (gateway/asgi.py) answers exactly as FastAPI's
full path does: the same status, headers and body for every refusal, the same counted metrics,
the same last-resort 500 (re-raised for the server's log). Driven in-process over ASGI with no
lifespan: nothing here reaches Redis or a worker (every request is refused before admission)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.gateway import protocol
from tandem.gateway.app import create_app
from tandem.gateway.asgi import GatewayApp
from tandem.gateway.config import GatewayConfig
from tandem.gateway.state import GatewayState
from tests.unit.asgi_calls import call

KEY = "sk-test"
GOOD_PROMPT = [5, 6, 7]


@pytest.fixture
def state(tiny_model_dir: Path) -> GatewayState:
    return GatewayState(GatewayConfig(model_dir=tiny_model_dir, redis_url="redis://127.0.0.1:1", api_keys=(KEY,)))


def answer(sent: list[dict[str, Any]]) -> tuple[int, dict[str, str], Any]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, json.loads(body)


def completion(**fields: Any) -> bytes:
    return json.dumps({"prompt": GOOD_PROMPT, "max_tokens": 4, **fields}).encode()


CASES = [
    ("/v1/completions", completion(model="nope"), KEY, 404, "The model `nope` does not exist."),
    ("/v1/completions", b'{"prompt": [1, true]', KEY, 400, "The request body is not valid JSON"),
    ("/v1/completions", completion(prompt=[1, True]), KEY, 400, "Invalid value for 'prompt': prompt must be a string"),
    ("/v1/completions", completion(prompt=[1, 10**6]), KEY, 400, "Token id 1000000 is out of vocabulary"),
    ("/v1/completions", completion(), None, 401, "You didn't provide an API key."),
    ("/v1/completions", completion(), "sk-wrong", 401, "Incorrect API key provided"),
    ("/v1/chat/completions", b'{"messages": []}', KEY, 400, "Invalid value for 'messages'"),
    ("/v1/chat/completions", b"[1]", KEY, 400, "The request body must be a JSON object, got an array."),
]


@pytest.mark.parametrize(("path", "body", "key", "status", "message"), CASES)
def test_refusals_are_the_same_as_fastapis(
    state: GatewayState, path: str, body: bytes, key: str | None, status: int, message: str
) -> None:
    direct = create_app(state)
    full = create_app(state)
    full._direct.clear()  # every route through FastAPI's stack, as before the direct path
    got, raised = call(direct, path, body, key=key)
    expected, expected_raised = call(full, path, body, key=key)
    assert (raised, expected_raised) == (None, None)
    assert got == expected
    code, headers, error = answer(got)
    assert code == status and headers["content-type"] == "application/json"
    assert error["error"]["message"].startswith(message)
    metrics = state.metrics.render()[0].decode()
    line = f'tandem_requests_total{{endpoint="{path}",model_name="tiny-llama-v1",status="{status}"}} 2.0'
    assert line in metrics  # both apps counted their request under the route's path


def test_an_unexpected_exception_is_a_counted_500_and_reraised(
    state: GatewayState, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(raw: bytes, chat: bool, served: protocol.ServedModel) -> protocol.PreparedRequest:
        raise RuntimeError("injected")

    monkeypatch.setattr(protocol, "prepare", broken)
    sent, raised = call(create_app(state), "/v1/completions", completion(), key=KEY)
    assert isinstance(raised, RuntimeError) and str(raised) == "injected"
    status, _, body = answer(sent)
    assert (status, body) == (
        500,
        {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
    )
    metrics = state.metrics.render()[0].decode()
    assert 'tandem_requests_total{endpoint="/v1/completions",model_name="tiny-llama-v1",status="500"} 1.0' in metrics


def test_the_direct_path_runs_only_the_endpoint(state: GatewayState, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct POST never enters FastAPI's middleware stack; other methods, other paths and a
    root path do."""
    app = create_app(state)
    entered: list[str] = []

    async def stack(scope: Any, receive: Any, send: Any) -> None:
        entered.append(f"{scope['method']} {scope['path']}")

    monkeypatch.setattr(app, "middleware_stack", stack)
    call(app, "/v1/completions", completion(model="nope"), key=KEY)
    call(app, "/v1/chat/completions", b"{}", key=KEY)
    assert entered == []
    call(app, "/v1/completions", b"", method="GET", key=KEY)
    call(app, "/tokenize", b"{}", key=KEY)
    call(app, "/v1/completions", completion(), root_path="/api", key=KEY)
    assert entered == ["GET /v1/completions", "POST /tokenize", "POST /api/v1/completions"]


def test_a_wrong_method_is_still_fastapis_405(state: GatewayState) -> None:
    sent, raised = call(create_app(state), "/v1/completions", b"", method="GET", key=KEY)
    assert raised is None
    status, _, body = answer(sent)
    assert (status, body["error"]["message"], body["error"]["type"]) == (
        405,
        "Method Not Allowed",
        "invalid_request_error",
    )


def test_only_registered_post_routes_can_be_direct(state: GatewayState) -> None:
    app = create_app(state)
    assert isinstance(app, GatewayApp)
    with pytest.raises(ValueError, match=r"^'/health' is not one registered POST route: it cannot be served directly$"):
        app.add_direct_route("/health")  # a GET route
