"""The gateway's API document, its integer bounds and its last-resort 500 (issue 16, deliverable 4).

The app is driven in-process over ASGI (no lifespan: nothing here needs Redis or a worker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.gateway import protocol
from tandem.gateway.app import create_app
from tandem.gateway.bodies import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tandem.gateway.config import GatewayConfig
from tandem.gateway.errors import OpenAIError
from tandem.gateway.state import GatewayState
from tests.unit.asgi_calls import call


@pytest.fixture(scope="module")
def state(tiny_model_dir: Path) -> GatewayState:
    return GatewayState(GatewayConfig(model_dir=tiny_model_dir, redis_url="redis://127.0.0.1:1"))


def _call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request through the ASGI app; an exception the app re-raises after answering is dropped."""
    sent, raised = call(app, path, body, method)
    if raised is not None and not (isinstance(raised, RuntimeError) and str(raised) == "injected"):
        raise raised
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_an_unexpected_exception_is_a_counted_500_in_openai_shape(
    state: GatewayState, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(raw: bytes, served: protocol.ServedModel) -> list[int]:
        raise RuntimeError("injected")

    monkeypatch.setattr(protocol, "tokenize_body", broken)
    status, body = _call(create_app(state), "POST", "/tokenize", b'{"prompt": "x"}')
    assert status == 500
    assert json.loads(body) == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    metrics = state.metrics.render()[0].decode()
    assert 'tandem_requests_total{endpoint="/tokenize",model_name="tiny-llama-v1",status="500"} 1.0' in metrics


def test_the_document_describes_every_body_with_its_own_model(state: GatewayState) -> None:
    status, body = _call(create_app(state), "GET", "/openapi.json")
    assert status == 200
    document = json.loads(body)
    schemas = document["components"]["schemas"]
    for path, model in (
        ("/v1/completions", CompletionRequest),
        ("/v1/chat/completions", ChatCompletionRequest),
        ("/tokenize", TokenizeRequest),
        ("/detokenize", DetokenizeRequest),
    ):
        request_body = document["paths"][path]["post"]["requestBody"]
        assert request_body == {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        own.pop("$defs", None)
        assert schemas[model.__name__] == own
        assert set(document["paths"][path]["post"]["responses"]) >= {"400", "401", "404", "413", "429", "500", "503"}


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"top_k": 2**40}, "top_k", "Invalid value for 'top_k': Input should be less than or equal to 4294967295."),
        (
            {"stop_token_ids": [2**63]},
            "stop_token_ids[0]",
            "Invalid value for 'stop_token_ids[0]': Input should be less than 2147483648.",
        ),
        (
            {"stop_token_ids": list(range(1025))},
            "stop_token_ids",
            "Invalid value for 'stop_token_ids': List should have at most 1024 items after validation, not 1025.",
        ),
        (
            {"priority": 2**40},
            "priority",
            "Invalid value for 'priority': Input should be less than or equal to 2147483647.",
        ),
        (
            {"priority": -(2**31) - 1},
            "priority",
            "Invalid value for 'priority': Input should be greater than or equal to -2147483648.",
        ),
    ],
)
def test_integers_are_bounded_before_the_wire(fields: dict[str, Any], param: str, message: str) -> None:
    raw = json.dumps({"prompt": "x", **fields}).encode()
    with pytest.raises(OpenAIError) as err:
        protocol.parse_body(raw, CompletionRequest, 8)
    assert (err.value.status_code, err.value.param, err.value.message) == (400, param, message)


def test_the_largest_wire_values_are_accepted() -> None:
    raw = json.dumps(
        {"prompt": "x", "top_k": 2**32 - 1, "stop_token_ids": [2**31 - 1] * 1024, "priority": 2**31 - 1}
    ).encode()
    req = protocol.parse_body(raw, CompletionRequest, 8)
    assert (req.top_k, len(req.stop_token_ids or ()), req.priority) == (2**32 - 1, 1024, 2**31 - 1)


def test_the_document_describes_tools_and_structured_output(state: GatewayState) -> None:
    status, body = _call(create_app(state), "GET", "/openapi.json")
    assert status == 200
    schemas = json.loads(body)["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("tools", "tool_choice", "parallel_tool_calls", "response_format", "structured_outputs"):
        assert field in chat
    for field in ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice"):
        assert field in schemas["CompletionRequest"]["properties"]
    assert chat["tool_choice"]["anyOf"][:2] == [
        {"enum": ["none", "auto", "required"], "type": "string"},
        {"$ref": "#/components/schemas/NamedToolChoice"},
    ]
    assert schemas["Tool"]["required"] == ["type", "function"]
    assert set(schemas["FunctionDefinition"]["properties"]) == {"name", "description", "parameters", "strict"}
    assert set(schemas["JsonSchemaFormat"]["properties"]) == {"name", "description", "schema", "strict"}
    assert set(schemas["StructuredOutputs"]["properties"]) == {"json", "regex", "choice", "grammar", "json_object"}
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == ["text", "json_object", "json_schema"]
