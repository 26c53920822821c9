"""The gateway's HTTP surface: FastAPI routes of the OpenAI API and the operational endpoints.

Lifecycle of a request (DESIGN.md section 2, steps 1 and 5):
1. The body is read with a size cap (413), authenticated (401), parsed and validated (400,
   404 for an unknown model), tokenized (chat template for chat), and checked against
   `max_model_len` with vLLM's wording.
2. The per-key rate limits are charged in Redis: one request and prompt + max_tokens tokens
   per choice (429 with Retry-After).
3. A `Generation` runs the choices through the pipeline. Streaming responses wait for the
   first event before the headers go out, so routing failures are real HTTP errors (503 with
   Retry-After); after that, an error is one `data:` error event followed by `[DONE]`.
4. A client that disconnects cancels the generation (Starlette cancels a streaming body;
   non-streaming requests are watched for `http.disconnect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.common.tracing import extract_metadata
from tandem.gateway import protocol, responses
from tandem.gateway.errors import OpenAIError, body_too_large, internal_error, sse_error_event
from tandem.gateway.generation import ChoiceSpec, Generation
from tandem.gateway.state import GatewayState

T = TypeVar("T")
log = logging.getLogger(__name__)


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The request body, refusing (413) anything over `limit_bytes` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise body_too_large(limit_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise body_too_large(limit_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (non-streaming responses)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected()
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def _endpoint(request: Request) -> str:
    """The matched route's path (a bounded label set), or "other"."""
    route = request.scope.get("route")
    return getattr(route, "path", "other")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(title="Tandem gateway", lifespan=state.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    config = state.config

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        if not getattr(request.state, "counted", False):
            state.metrics.request_done(_endpoint(request), exc.status_code)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=dict(exc.headers))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error", None, exc.status_code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.scheduler.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {"status": "no routable decode worker"}, status_code=503, headers={"Retry-After": str(config.retry_after_s)}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        state.update_pool_gauges()
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        state.authenticate(request)
        return JSONResponse(responses.models_response(config.model_name, state.max_model_len, state.created))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        state.authenticate(request)
        req = protocol.parse_body(
            await read_body(request, config.max_body_bytes), protocol.TokenizeRequest, config.max_n
        )
        state.check_model(req.model)
        ids = protocol.tokenize_request(req, state.tokenizer)
        return JSONResponse({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        state.authenticate(request)
        req = protocol.parse_body(
            await read_body(request, config.max_body_bytes), protocol.DetokenizeRequest, config.max_n
        )
        state.check_model(req.model)
        protocol.check_token_ids(req.tokens, state.vocab_size, "tokens")
        return JSONResponse({"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, chat=True)

    async def serve(request: Request, chat: bool) -> Response:
        start_s = time.perf_counter()
        key_id = state.authenticate(request)
        body = await read_body(request, config.max_body_bytes)
        model_cls = protocol.ChatCompletionRequest if chat else protocol.CompletionRequest
        req = protocol.parse_body(body, model_cls, config.max_n)
        state.check_model(req.model)
        prompts = state.prompts(req, chat)
        choices: list[ChoiceSpec] = []
        for p, prompt in enumerate(prompts):
            max_tokens = protocol.resolve_max_tokens(
                req.requested_max_tokens if chat else req.max_tokens,
                len(prompt),
                state.max_model_len,
                "messages" if chat else "prompt",
                "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens",
            )
            for i in range(req.n):
                choices.append(ChoiceSpec(p * req.n + i, tuple(prompt), protocol.to_sampling(req, max_tokens, i)))
        await state.charge(key_id, sum(len(c.prompt_token_ids) + c.sampling.max_tokens for c in choices))
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        span = state.tracer.start_span(
            "gateway",
            context=extract_metadata(request.headers.items()),
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "chat" if chat else "text_completion",
                "gen_ai.request.model": config.model_name,
                "gen_ai.request.max_tokens": choices[0].sampling.max_tokens,
                "gen_ai.request.temperature": choices[0].sampling.temperature,
                "gen_ai.request.top_p": choices[0].sampling.top_p,
                "gen_ai.response.id": request_id,
                "gen_ai.usage.input_tokens": sum(len(p) for p in prompts),
                "tandem.request_id": request_id,
            },
        )
        ctx = trace.set_span_in_context(span)
        generation = Generation(
            state.pipeline,
            state.tokenizer,
            state.metrics,
            request_id,
            choices,
            protocol.stop_strings(req),
            req.cache_salt,
            ctx,
            req.skip_special_tokens,
            req.include_stop_str_in_output,
        )
        view = responses.ResponseView(
            request_id,
            int(time.time()),
            config.model_name,
            chat,
            [list(p) for p in prompts],
            req.n,
            req.return_token_ids,
            state.logprob_count(req),
            state.tokenizer,
        )
        finish = _Finisher(state, span, generation, _endpoint(request), start_s)
        request.state.counted = True  # the finisher records this request's status
        if not req.stream:
            try:
                body_dict = await until_disconnect(request, _collect(generation, view))
            except ClientDisconnected:
                state.metrics.client_disconnect()
                finish(499, "client disconnected")
                return Response(status_code=499)
            except OpenAIError as exc:
                finish(exc.status_code, exc.message)
                raise
            finish(200)
            return JSONResponse(body_dict)
        events = generation.events()
        try:
            first = await until_disconnect(request, events.__anext__())
        except ClientDisconnected:
            await events.aclose()
            state.metrics.client_disconnect()
            finish(499, "client disconnected")
            return Response(status_code=499)
        except OpenAIError as exc:
            await events.aclose()
            finish(exc.status_code, exc.message)
            raise
        include_usage = req.include_usage
        return StreamingResponse(
            _sse(first, events, view, generation, include_usage, finish),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return app


class _Finisher:
    """Ends a request's root span and records its end-to-end metrics exactly once."""

    def __init__(
        self, state: GatewayState, span: trace.Span, generation: Generation, endpoint: str, start_s: float
    ) -> None:
        self.state, self.span, self.generation, self.endpoint, self.start_s = state, span, generation, endpoint, start_s
        self.done = False

    def __call__(self, status: int, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        generated = self.generation.num_generated_tokens
        self.state.metrics.request_done(self.endpoint, status)
        if status == 200:
            self.state.metrics.observe_e2e(time.perf_counter() - self.start_s)
            prompt_tokens = sum(len(c.prompt_token_ids) for c in self.generation.choices)
            self.state.metrics.tokens(prompt_tokens, generated)
        self.span.set_attribute("gen_ai.usage.output_tokens", generated)
        reasons = [t.finish_reason for t in self.generation.totals.values() if t.finish_reason]
        self.span.set_attribute("gen_ai.response.finish_reasons", reasons)
        self.span.set_attribute("http.response.status_code", status)
        if error is not None:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        self.span.end()


async def _collect(generation: Generation, view: responses.ResponseView) -> dict[str, Any]:
    async for event in generation.events():
        if event.error is not None:
            raise internal_error(f"generation failed: {event.error}")
    return view.full_response(generation.totals)


async def _sse(
    first: Any,
    events: AsyncIterator[Any],
    view: responses.ResponseView,
    generation: Generation,
    include_usage: bool,
    finish: _Finisher,
) -> AsyncIterator[bytes]:
    status, error = 499, "client disconnected"
    try:
        yield b"".join(view.stream_chunks(first))
        async for event in events:
            if event.error is not None:
                yield sse_error_event(internal_error(f"generation failed: {event.error}"))
                status, error = 500, event.error
                break
            yield b"".join(view.stream_chunks(event))
        else:
            if include_usage:
                yield responses.sse(view.usage_chunk(generation.totals))
            status, error = 200, None
        yield responses.SSE_DONE
    except OpenAIError as exc:  # a later choice could not be routed
        yield sse_error_event(exc)
        yield responses.SSE_DONE
        status, error = exc.status_code, exc.message
    finally:
        await events.aclose()
        if status == 499:
            generation.metrics.client_disconnect()
        finish(status, error)
