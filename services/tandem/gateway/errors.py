"""OpenAI-style errors of the gateway (DESIGN.md section 8).

Every refusal is an `OpenAIError`: an HTTP status, the body `{"error": {message, type, param,
code}}` that OpenAI's API and SDKs use, and optional response headers (Retry-After on 429 and
503, WWW-Authenticate on 401). Request handling raises them; the app's exception handler turns
one into a JSON response with `status_code`, `body()` and `headers`. Once an SSE stream has
started the status line is gone, so the error travels as `sse_error_event(err)` followed by
`data: [DONE]`, as vLLM does.

The constructors below are the only places that choose wording, type and code, so every
endpoint says the same thing for the same problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from tandem.gateway.responses import sse

INVALID_REQUEST = "invalid_request_error"


class OpenAIError(Exception):
    """A request failure with its HTTP status and OpenAI error body. Immutable once raised."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: Mapping[str, str] = MappingProxyType(dict(headers or {}))

    def body(self) -> dict[str, Any]:
        """The JSON body: exactly `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"OpenAIError({self.status_code}, {self.message!r}, type={self.type!r}, param={self.param!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    """400: the request is malformed or asks for something this server cannot do."""
    return OpenAIError(400, message, INVALID_REQUEST, param, code)


def context_length_exceeded(message: str, param: str) -> OpenAIError:
    """400 for a prompt (plus completion) longer than the model's context, as OpenAI words it."""
    return OpenAIError(400, message, INVALID_REQUEST, param, "context_length_exceeded")


def missing_api_key() -> OpenAIError:
    """401 for a request without a Bearer key, in OpenAI's words."""
    return OpenAIError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization header "
        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        "authentication_error",
        None,
        "invalid_api_key",
        {"WWW-Authenticate": "Bearer"},
    )


def invalid_api_key() -> OpenAIError:
    """401 for a Bearer key that is not configured. The key itself is never echoed back."""
    return OpenAIError(
        401,
        "Incorrect API key provided.",
        "authentication_error",
        None,
        "invalid_api_key",
        {"WWW-Authenticate": "Bearer"},
    )


def model_not_found(model: str) -> OpenAIError:
    """404 for a `model` this gateway does not serve."""
    return OpenAIError(404, f"The model `{model}` does not exist.", INVALID_REQUEST, "model", "model_not_found")


def body_too_large(limit_bytes: int) -> OpenAIError:
    """413 for a request body over the configured limit."""
    return OpenAIError(
        413,
        f"The request body is too large: the limit is {limit_bytes} bytes.",
        INVALID_REQUEST,
        None,
        "request_too_large",
    )


def rate_limited(message: str, retry_after_s: float) -> OpenAIError:
    """429 with `Retry-After` in whole seconds, rounded up (a client that waits that long may retry)."""
    return OpenAIError(
        429,
        message,
        "rate_limit_exceeded",
        None,
        "rate_limit_exceeded",
        {"Retry-After": str(_retry_after_seconds(retry_after_s))},
    )


def service_unavailable(message: str, retry_after_s: float) -> OpenAIError:
    """503 (no worker can take the request now) with `Retry-After` in whole seconds, rounded up."""
    return OpenAIError(
        503, message, "service_unavailable", None, None, {"Retry-After": str(_retry_after_seconds(retry_after_s))}
    )


def slow_client_aborted(max_buffered_events: int, timeout_s: float) -> OpenAIError:
    """408 for a streaming client that stopped reading: its buffer stayed full, so the request
    was aborted (the client only sees it if it reads again)."""
    return OpenAIError(
        408,
        f"The client read the response too slowly: its buffer of {max_buffered_events} events stayed full "
        f"for {timeout_s} s, so the request was aborted.",
        "timeout_error",
        None,
        "slow_client",
    )


def internal_error(message: str = "The server had an error while processing your request.") -> OpenAIError:
    """500: a bug or an unexpected failure; the message must not leak internals."""
    return OpenAIError(500, message, "server_error", None, None)


def sse_error_event(err: OpenAIError) -> bytes:
    """`data: {"error": {...}}\\n\\n`: an error after the stream started (send `data: [DONE]` next)."""
    return sse(err.body())


def _retry_after_seconds(retry_after_s: float) -> int:
    if not math.isfinite(retry_after_s):
        raise ValueError(f"retry_after_s must be finite, got {retry_after_s!r}")
    return max(0, math.ceil(retry_after_s))
