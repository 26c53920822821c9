"""The gateway's API document, `/openapi.json`, built from the models that validate requests.

The handlers read the raw body themselves (`protocol.parse_body`: strict types, OpenAI's error
wording, NaN refused), so FastAPI sees no body parameter. Each route instead names its body
model here (`request_body`) and its error responses (`ERRORS`); `install` generates the document
with FastAPI and adds the JSON schema of every body model (pydantic's, in validation mode) and
of the error body under `components.schemas`. The document describes; validation is unchanged.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tandem.gateway.bodies import Body, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

_REF = "#/components/schemas/{model}"
BODY_MODELS: tuple[type[Body], ...] = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, `errors.OpenAIError.body()`."""

    error: ErrorDetail


def request_body(model: type[Body]) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON body is `model`."""
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}},
    }


_ERROR_DESCRIPTIONS = {
    400: "The request is malformed or asks for something this server cannot do.",
    401: "No API key, or one that is not accepted.",
    404: "The model does not exist.",
    413: "The request body is over the size limit.",
    429: "A rate limit or the key's share of the server is used up (see Retry-After).",
    500: "An unexpected failure.",
    503: "No worker can take the request now (see Retry-After).",
}
ERRORS: dict[int | str, dict[str, Any]] = {status: _error(text) for status, text in _ERROR_DESCRIPTIONS.items()}
GENERATION_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion (JSON), or with `stream` its server-sent events.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {},
        },
    }
}

_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
READY: dict[int | str, dict[str, Any]] = {
    200: {"description": "A decode worker is routable.", "content": {"application/json": {"schema": _STATUS}}},
    503: {"description": "No routable decode worker.", "content": {"application/json": {"schema": _STATUS}}},
}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (served at the app's `openapi_url`) include the body models."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            models: list[tuple[type[BaseModel], Any]] = [(m, "validation") for m in BODY_MODELS]
            models.append((ErrorResponse, "serialization"))
            _, definitions = models_json_schema(models, ref_template=_REF)
            document.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
