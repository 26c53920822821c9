"""Serving one completions or chat request over HTTP, from the body to the last byte.

Lifecycle of a request (DESIGN.md section 2, steps 1 and 5), in `serve_generation`:
1. The body is read with a size cap (413), authenticated (401), and prepared by
   `protocol.prepare`: parsed and validated (400, 404 for an unknown model), tokenized (chat
   template for chat), and checked against `max_model_len` with vLLM's wording. The input
   guardrails (guardrails/) then allow it, reject it (400 naming the guardrail) or rewrite it
   (the rewritten body is prepared again); with none configured this step does nothing.
2. Admission (admission.py) refuses at once what the pools cannot start within the TTFT
   budget, lower priorities first (429 per key, 503 for the cluster, with Retry-After); an
   admitted request holds a ticket until it ends. Then the per-key rate limits are charged
   in Redis: one request and prompt + max_tokens tokens per choice (429 with Retry-After).
3. A `Generation` runs the choices through the pipeline. Streaming responses wait for the
   first event before the headers go out, so any failure before the first token is a real
   HTTP error with OpenAI's error shape (503 with Retry-After when the workers failed);
   after that, an error is one `data:` error event followed by `[DONE]`. Never a 200 with
   zero tokens.
4. A client that disconnects cancels the generation (Starlette cancels a streaming body;
   non-streaming requests are watched for `http.disconnect`).
5. `_Finisher` ends the request's root span, records its real status (an error event after
   the headers counts as its error's status) and end-to-end metrics, and returns its
   admission ticket, exactly once, whichever way the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from tandem.common.tracing import extract_metadata
from tandem.gateway import protocol, responses
from tandem.gateway.admission import AdmissionTicket
from tandem.gateway.echo import prompt_display
from tandem.gateway.errors import OpenAIError, bad_request, body_too_large, internal_error, sse_error_event
from tandem.gateway.generation import ChoiceEvent, Generation, StreamLimits
from tandem.gateway.guardrails import guard_input
from tandem.gateway.response_view import ResponseView
from tandem.gateway.state import GatewayState

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


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


def endpoint_label(request: Request) -> str:
    """The matched route's path (a bounded label set), or "other"."""
    route = request.scope.get("route")
    return getattr(route, "path", "other")


async def serve_generation(state: GatewayState, request: Request, chat: bool) -> Response:
    """/v1/chat/completions (`chat`) or /v1/completions: steps 1 to 5 of the module docstring."""
    start_s = time.perf_counter()
    key_id = state.authenticate(request)
    prepared = protocol.prepare(await read_body(request, state.config.max_body_bytes), chat, state.served)
    if state.guardrails.input_hooks or state.guardrails.output_hooks:
        prepared = _guard(state, prepared, chat)
    priority = state.admission.priority(key_id, prepared.requested_priority)
    ticket = state.admission.admit(key_id, priority, prepared.num_prompt_tokens)
    try:
        await state.charge(key_id, prepared.num_charged_tokens)
    except BaseException:
        ticket.finished()
        raise
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    span = _start_span(state, request, prepared, request_id)
    span.set_attribute("tandem.priority", priority)
    body, tokenizer, config = prepared.body, state.served.tokenizer, state.config
    limits = StreamLimits(config.max_buffered_events, config.slow_client_timeout_s, config.retry_after_s)

    def slow_client(error: OpenAIError) -> None:  # the request ends at the abort: `finish` is bound below
        finish(error.status_code, error.message)

    generation = Generation(
        state.pipeline,
        tokenizer,
        state.metrics,
        request_id,
        prepared.choices,
        prepared.stop,
        body.cache_salt,
        trace.set_span_in_context(span),
        prepared.skip_special_tokens,
        body.include_stop_str_in_output,
        limits,
        slow_client,
        priority,
        state.guardrails,
        state.session(request, body.user),
    )
    view = ResponseView(
        request_id,
        int(time.time()),
        state.served.name,
        chat,
        prepared.prompts,
        body.n,
        body.return_token_ids,
        prepared.logprob_count,
        tokenizer,
        tool_choice=prepared.tool_choice,
        display=prompt_display(prepared, tokenizer),
    )
    finish = _Finisher(span, generation, ticket, endpoint_label(request), start_s)
    request.state.counted = True  # the finisher records this request's status
    if not body.stream:
        return await _respond_json(request, generation, view, finish)
    return await _respond_sse(request, generation, view, finish, body.include_usage)


def _guard(state: GatewayState, prepared: protocol.PreparedRequest, chat: bool) -> protocol.PreparedRequest:
    """The request after the input guardrails (a rewrite is prepared again: validated like a
    client's body). With output guardrails, token ids and logprobs are refused: they would
    show the text that the guardrails redact or cut."""
    guardrails = state.guardrails
    if guardrails.output_hooks and (prepared.logprob_count is not None or prepared.body.return_token_ids):
        names = ", ".join(h.name for h in guardrails.output_hooks)
        param = "return_token_ids" if prepared.body.return_token_ids else "logprobs"
        raise bad_request(f"{param} is not available with output guardrails ({names}) configured.", param)
    if not guardrails.input_hooks:
        return prepared
    rewritten = guardrails.check_input(guard_input(prepared.body))
    if rewritten is None:
        return prepared
    return protocol.prepare(json.dumps(rewritten.to_body()).encode(), chat, state.served)


def _start_span(
    state: GatewayState, request: Request, prepared: protocol.PreparedRequest, request_id: str
) -> trace.Span:
    """The request's root span, a child of the caller's W3C trace context if it sent one."""
    first = prepared.choices[0].sampling
    return state.tracer.start_span(
        "gateway",
        context=extract_metadata(request.headers.items()),
        kind=SpanKind.SERVER,
        attributes={
            "gen_ai.operation.name": "chat" if prepared.chat else "text_completion",
            "gen_ai.request.model": state.served.name,
            "gen_ai.request.max_tokens": first.max_tokens,
            "gen_ai.request.temperature": first.temperature,
            "gen_ai.request.top_p": first.top_p,
            "gen_ai.response.id": request_id,
            "gen_ai.usage.input_tokens": prepared.num_prompt_tokens,
            "tandem.request_id": request_id,
        },
    )


async def _respond_json(request: Request, generation: Generation, view: ResponseView, finish: _Finisher) -> Response:
    try:
        body = await until_disconnect(request, _collect(generation, view, finish.ticket))
    except ClientDisconnected:
        finish(499, "client disconnected")
        return Response(status_code=499)
    except OpenAIError as exc:
        finish(exc.status_code, exc.message)
        raise
    finish(200)
    return JSONResponse(body)


async def _respond_sse(
    request: Request, generation: Generation, view: ResponseView, finish: _Finisher, include_usage: bool
) -> Response:
    events = generation.events()
    try:
        first = await until_disconnect(request, events.__anext__())
    except ClientDisconnected:
        await events.aclose()
        finish(499, "client disconnected")
        return Response(status_code=499)
    except OpenAIError as exc:
        await events.aclose()
        finish(exc.status_code, exc.message)
        raise
    if first.error is not None:  # cannot happen (a choice's first failure is raised), but never a 200
        await events.aclose()
        err = internal_error(f"generation failed: {first.error}")
        finish(err.status_code, err.message)
        raise err
    finish.ticket.started(generation.first_queue_s)
    return StreamingResponse(
        _sse(first, events, view, generation, include_usage, finish),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class _Finisher:
    """Ends a request's root span and records its end-to-end metrics exactly once (status 499:
    the client went away, counted in `tandem_client_disconnects_total`)."""

    def __init__(
        self, span: trace.Span, generation: Generation, ticket: AdmissionTicket, endpoint: str, start_s: float
    ) -> None:
        self.metrics = generation.metrics
        self.span = span
        self.generation = generation
        self.ticket = ticket
        self.endpoint = endpoint
        self.start_s = start_s
        self.done = False

    def __call__(self, status: int, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.ticket.finished()
        generated = self.generation.num_generated_tokens
        self.metrics.request_done(self.endpoint, status)
        if status == 499:
            self.metrics.client_disconnect()
        if status == 200:
            self.metrics.observe_e2e(time.perf_counter() - self.start_s)
            prompt_tokens = sum(len(c.prompt_token_ids) for c in self.generation.choices)
            self.metrics.tokens(prompt_tokens, generated)
        self.span.set_attribute("gen_ai.usage.output_tokens", generated)
        reasons = [t.finish_reason for t in self.generation.totals.values() if t.finish_reason]
        self.span.set_attribute("gen_ai.response.finish_reasons", reasons)
        self.span.set_attribute("http.response.status_code", status)
        if error is not None:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        self.span.end()


async def _collect(generation: Generation, view: ResponseView, ticket: AdmissionTicket) -> dict[str, Any]:
    async for event in generation.events():
        ticket.started(generation.first_queue_s)
        if event.error is not None:
            raise internal_error(f"generation failed: {event.error}")
    return view.full_response(generation.totals)


async def _sse(
    first: ChoiceEvent,
    events: AsyncGenerator[ChoiceEvent, None],
    view: ResponseView,
    generation: Generation,
    include_usage: bool,
    finish: _Finisher,
) -> AsyncIterator[bytes]:
    status: int = 499
    error: str | None = "client disconnected"
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
    except OpenAIError as exc:  # a later choice failed before its output, or the client read too slowly
        yield sse_error_event(exc)
        yield responses.SSE_DONE
        status, error = exc.status_code, exc.message
    finally:
        await events.aclose()
        finish(status, error)
