"""The streaming client: sends one `WorkloadRequest` and returns its `RequestRecord`.

Lifecycle of one request (`StreamingClient.send`):
1. Build the body: /v1/completions with `prompt` as token ids, or /v1/chat/completions with
   the request's messages; always `stream: true`, `stream_options.include_usage`, `ignore_eos`
   (so that exactly `max_tokens` tokens come back) and `return_token_ids` (Tandem and vLLM send
   a chunk for every token even when its text is still incomplete UTF-8).
2. Read the SSE stream. Every chunk whose choice carries output (token ids, text or content)
   records one arrival time; the usage chunk gives the token counts.
3. Classify the outcome: `[DONE]` after no error event -> success. HTTP status 4xx/5xx ->
   http_4xx/http_5xx; an `{"error": ...}` event, bad JSON or a stream that ends without
   `[DONE]` -> stream_error; httpx timeouts or the overall `timeout_s` -> timeout; other
   transport failures -> connection.

One `StreamingClient` owns one `httpx2.AsyncClient` (a connection pool shared by all requests
of a run); use it as an async context manager.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2

from tandem.loadtest.record import ErrorKind, RequestRecord
from tandem.loadtest.request import WorkloadRequest


class Endpoint(str, enum.Enum):
    """Which OpenAI API to call; the value is the path under the base URL."""

    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to send requests. `timeout_s` bounds each whole request."""

    base_url: str
    model: str
    endpoint: Endpoint = Endpoint.COMPLETIONS
    timeout_s: float = 300.0
    api_key: str | None = field(default=None, repr=False)
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}.")
        if not self.model:
            raise ValueError("model must be a non-empty model name (the server's /v1/models lists them).")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}.")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}.")


def render_text(token_ids: tuple[int, ...]) -> str:
    """Chat content for synthetic token ids (the client has no tokenizer): one word per id."""
    return " ".join(f"w{t}" for t in token_ids)


def request_body(config: ClientConfig, request: WorkloadRequest) -> dict[str, Any]:
    """The JSON body for `request` on `config.endpoint`."""
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if config.endpoint is Endpoint.COMPLETIONS:
        body["prompt"] = list(request.prompt_token_ids)
    else:
        messages = request.messages or ()
        body["messages"] = [{"role": m.role.value, "content": render_text(m.token_ids)} for m in messages] or [
            {"role": "user", "content": render_text(request.prompt_token_ids)}
        ]
    return body


_LINE_END = re.compile(r"\r\n|\r|\n")


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The lines of an event stream, split only where SSE ends lines (CRLF, CR or LF). httpx's
    `aiter_lines` also splits at U+0085, U+2028 and U+2029, which JSON leaves raw inside a
    string, so it can cut one `data:` line in two."""
    pending = ""
    async for chunk in chunks:
        pending += chunk
        # A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
        cut = len(pending) - 1 if pending.endswith("\r") else len(pending)
        *lines, rest = _LINE_END.split(pending[:cut])
        pending = rest + pending[cut:]
        for line in lines:
            yield line
    *lines, rest = _LINE_END.split(pending)
    for line in [*lines, rest] if rest else lines:
        yield line


class _StreamFailure(Exception):
    """Internal: the stream reported or showed an error (becomes ErrorKind.STREAM_ERROR)."""


def _carries_output(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if choice.get("token_ids") or choice.get("text") or delta.get("content"):
            return True
    return False


@dataclass
class _Progress:
    """Mutable state of one in-flight request; owned by `StreamingClient.send` alone."""

    token_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    http_status: int | None = None


class StreamingClient:
    """Sends requests and records timings. `clock()` returns seconds (the runner's run clock)."""

    def __init__(
        self,
        config: ClientConfig,
        clock: Callable[[], float] = time.perf_counter,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx2.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections)
        self._http = httpx2.AsyncClient(
            base_url=config.base_url,
            headers=headers,
            limits=limits,
            timeout=httpx2.Timeout(config.timeout_s),
            transport=transport,
        )

    async def __aenter__(self) -> StreamingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def send(self, request: WorkloadRequest) -> RequestRecord:
        """Send `request`, stream the response to its end, and return its record. Never raises
        for server or network failures: they become the record's `error`."""
        progress = _Progress()
        start_s = self._clock()
        error: ErrorKind | None = None
        message = ""
        try:
            await asyncio.wait_for(self._stream(request, progress), timeout=self.config.timeout_s)
        except (asyncio.TimeoutError, httpx2.TimeoutException) as exc:
            error, message = ErrorKind.TIMEOUT, f"no complete response within {self.config.timeout_s:g} s ({exc!r})"
        except httpx2.HTTPStatusError as exc:
            status = exc.response.status_code
            error, message = (ErrorKind.HTTP_4XX if status < 500 else ErrorKind.HTTP_5XX), str(exc.args[0])
        except _StreamFailure as exc:
            error, message = ErrorKind.STREAM_ERROR, str(exc)
        except httpx2.TransportError as exc:
            error, message = ErrorKind.CONNECTION, repr(exc)
        end_s = max(self._clock(), progress.token_times_s[-1] if progress.token_times_s else start_s)
        prompt_tokens = request.prompt_len if progress.prompt_tokens is None else progress.prompt_tokens
        if progress.cached_tokens is not None and not 0 <= progress.cached_tokens <= prompt_tokens:
            if error is None:
                error = ErrorKind.STREAM_ERROR
                message = f"usage reports cached_tokens={progress.cached_tokens} of {prompt_tokens} prompt tokens"
            progress.cached_tokens = None
        return RequestRecord(
            request_id=request.request_id,
            start_s=start_s,
            end_s=end_s,
            token_times_s=tuple(progress.token_times_s),
            prompt_tokens=prompt_tokens,
            output_tokens=len(progress.token_times_s) if progress.output_tokens is None else progress.output_tokens,
            error=error,
            http_status=progress.http_status,
            error_message=message,
            cached_tokens=progress.cached_tokens,
        )

    async def _stream(self, request: WorkloadRequest, progress: _Progress) -> None:
        body = request_body(self.config, request)
        async with self._http.stream("POST", self.config.endpoint.value, json=body) as response:
            progress.http_status = response.status_code
            if response.status_code >= 400:
                detail = (await response.aread()).decode(errors="replace")[:500]
                raise httpx2.HTTPStatusError(
                    f"HTTP {response.status_code}: {detail}", request=response.request, response=response
                )
            async for line in sse_lines(response.aiter_text()):
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                self._on_chunk(data, progress)
        raise _StreamFailure("the stream ended without [DONE]")

    def _on_chunk(self, data: str, progress: _Progress) -> None:
        now_s = self._clock()
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise _StreamFailure(f"a stream chunk is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise _StreamFailure(f"a stream chunk is not a JSON object: {data[:200]!r}")
        if "error" in chunk:
            raise _StreamFailure(f"error event: {json.dumps(chunk['error'])[:500]}")
        if _carries_output(chunk):
            progress.token_times_s.append(now_s)
        usage = chunk.get("usage")
        if usage:
            progress.prompt_tokens = int(usage.get("prompt_tokens", 0))
            progress.output_tokens = int(usage.get("completion_tokens", 0))
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                progress.cached_tokens = int(details["cached_tokens"])
