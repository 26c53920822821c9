"""One OpenAI request as a set of choices: runs them concurrently and merges their text.

`Generation` turns `prompts x n` into choices (choice index = prompt index * n + i, as vLLM
numbers them). Each choice is one `Pipeline.generate` stream, detokenized incrementally and
cut at stop strings; `events()` yields `ChoiceEvent`s from all choices as they arrive.

Ownership: `events()` owns the choice tasks. When its consumer stops early (client
disconnect, an error, the response closed), the `finally` cancels every task; each task's
pipeline generator is closed in turn, which cancels its decode stream. A choice that meets a
stop string closes its own generator the same way.

Failures (issue 15, "no silent failures"): a choice that fails before its first delta raises
an `OpenAIError` (503 with Retry-After: the worker, not the request, failed), so a response
whose headers are not sent yet becomes an HTTP error, never a 200 with zero tokens; a choice
that fails after output yields an event with `error`.

Slow clients: the events wait for the consumer (the client's socket) in one queue of at most
`StreamLimits.max_buffered_events`. A choice that finds it full waits at most
`slow_client_timeout_s`; then the request is aborted: every choice task is cancelled (closing
its decode stream, so the worker frees the sequence's blocks), the buffered events are
dropped, the request ends (`on_slow_client`: its status 408 is recorded and its admission
returned), and the consumer, whenever it reads again, gets `slow_client_aborted`.

Output guardrails (guardrails/window.py): with output hooks configured, each choice's text,
after stop strings, goes through its own `OutputWindow`, which holds back at most the window
and releases it redacted; a hook that stops the choice ends it with finish_reason
"content_filter" (its generator is closed as for a stop string; the tokens generated so far
still count in usage). Without output hooks there is no window and no extra work per delta.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry.context import Context

from tandem.common.request import FinishReason, PromptLogprobs, Request, SamplingParams, TokenLogprob
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.detokenize import IncrementalDetokenizer, StopStringMatcher
from tandem.gateway.errors import OpenAIError, service_unavailable, slow_client_aborted
from tandem.gateway.guardrails import NO_GUARDRAILS, Guardrails
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.pipeline import Pipeline, StreamError

_FINISH_TEXT = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


@dataclass(frozen=True)
class StreamLimits:
    """Per request: `max_buffered_events` held for a client that is not reading, how long
    (`slow_client_timeout_s`) the buffer may stay full before the request is aborted, and the
    Retry-After (`retry_after_s`) of a 503 for a failure before the first token."""

    max_buffered_events: int = 256
    slow_client_timeout_s: float = 5.0
    retry_after_s: float = 1.0


@dataclass(frozen=True)
class ChoiceSpec:
    """What one choice generates: its index, prompt and sampling parameters."""

    index: int
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class ChoiceEvent:
    """New output of one choice. `finish_reason` ("stop", "length", "abort") ends it; `error`
    means it failed after the response started."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # the choice's first event, when asked for


@dataclass
class ChoiceTotals:
    """Accumulated output of one choice (for non-streaming responses and usage)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None


class Generation:
    def __init__(
        self,
        pipeline: Pipeline,
        tokenizer: Tokenizer,
        metrics: GatewayMetrics,
        request_id: str,
        choices: Sequence[ChoiceSpec],
        stop: Sequence[str],
        cache_salt: str | None,
        trace_context: Context | None,
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
        limits: StreamLimits = StreamLimits(),
        on_slow_client: Callable[[OpenAIError], None] | None = None,
        priority: int = 0,
        guardrails: Guardrails = NO_GUARDRAILS,
        session: str | None = None,
    ) -> None:
        """`priority` goes into every choice's `Request` (workers order their queues by it).
        `guardrails` filter each choice's text (their output hooks); `session` is the hash of
        the request's session key (`tandem.scheduler.affinity`), None without one.
        `on_slow_client(error)` is called once when the request is aborted for a client
        that stopped reading (the request ends there, though its connection may stay open)."""
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.request_id = request_id
        self.choices = tuple(choices)
        self.stop = tuple(stop)
        self.cache_salt = cache_salt
        self.trace_context = trace_context
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str = include_stop_str
        self.limits = limits
        self._on_slow_client = on_slow_client
        self.priority = priority
        self.guardrails = guardrails
        self.session = session
        self.slow_client = False  # set once the client's buffer overflowed and the request was aborted
        self._tasks: list[asyncio.Task] = []
        self.totals = {c.index: ChoiceTotals() for c in self.choices}
        self.start_s = time.perf_counter()
        self.first_token_s: float | None = None
        self.first_queue_s: float | None = None  # the first delta's wait in a worker's queue (admission)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.totals.values())

    async def events(self) -> AsyncGenerator[ChoiceEvent, None]:
        """Merged events of every choice. Errors before any output are raised as they are
        (an `OpenAIError` becomes an HTTP error); later ones arrive as events with `error`."""
        queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue(self.limits.max_buffered_events)
        tasks = self._tasks = [asyncio.create_task(self._run(spec, queue)) for spec in self.choices]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, spec: ChoiceSpec, queue: asyncio.Queue) -> None:
        try:
            await self._generate(spec, queue)
        except Exception as exc:  # raised before the choice handles its own errors: events() re-raises it
            await self._put_or_abort(queue, exc)

    async def _generate(self, spec: ChoiceSpec, queue: asyncio.Queue) -> None:
        request = Request(
            f"{self.request_id}-{spec.index}", spec.prompt_token_ids, spec.sampling, self.cache_salt, self.priority
        )
        totals = self.totals[spec.index]
        detok = IncrementalDetokenizer(self.tokenizer, spec.prompt_token_ids, self.skip_special_tokens)
        matcher = StopStringMatcher(self.stop, self.include_stop_str)
        window = self.guardrails.output_window()  # None without output hooks
        generator = self.pipeline.generate(request, self.trace_context, self.session)
        last_s = time.perf_counter()
        received = False
        try:
            async for delta in generator:
                received = True
                now = time.perf_counter()
                if self.first_token_s is None:
                    self.first_token_s = now
                    self.first_queue_s = delta.queue_s
                    self.metrics.observe_ttft(now - self.start_s)
                elif delta.token_ids:
                    for _ in delta.token_ids:
                        self.metrics.observe_itl((now - last_s) / len(delta.token_ids))
                last_s = now
                totals.cached_tokens += delta.cached_tokens
                text, stopped = matcher.push(detok.push(delta.token_ids))
                if delta.finish_reason is not None and not stopped:
                    tail, stopped = matcher.push(detok.flush())  # a character cut off by the end
                    text += tail
                    if not stopped:
                        text += matcher.flush()
                finish = "stop" if stopped else _FINISH_TEXT[delta.finish_reason] if delta.finish_reason else None
                if window is not None:
                    released = window.push(text, finish is not None)
                    text = released.text
                    if released.stopped_by is not None:
                        finish = "content_filter"
                totals.text.append(text)
                totals.token_ids.extend(delta.token_ids)
                totals.logprobs.extend(delta.logprobs)
                totals.finish_reason = finish
                if delta.prompt_logprobs is not None:
                    totals.prompt_logprobs = delta.prompt_logprobs
                event = ChoiceEvent(
                    spec.index, text, delta.token_ids, delta.logprobs, finish, None, delta.prompt_logprobs
                )
                await self._put(queue, event)
                if finish is not None:
                    break
            else:
                raise StreamError("the generation ended without a finish reason")
        except _SlowClient:
            self._abort_slow_client(queue)
            return
        except StreamError as exc:
            if not received:  # nothing of this choice was sent: a real HTTP error if headers are not out yet
                await self._put_or_abort(queue, self._failed_before_output(exc))
                return
            await self._put_or_abort(queue, ChoiceEvent(spec.index, "", (), (), None, error=str(exc)))
        except Exception as exc:  # before any output: re-raised by events() as it is
            await self._put_or_abort(queue, exc)
            return
        finally:
            await generator.aclose()
        await self._put_or_abort(queue, None)

    def _failed_before_output(self, exc: StreamError) -> OpenAIError:
        return service_unavailable(f"the generation failed before its first token: {exc}", self.limits.retry_after_s)

    async def _put(self, queue: asyncio.Queue, item: ChoiceEvent | BaseException | None) -> None:
        """Buffer `item` for the client; `_SlowClient` if the buffer stays full past the bound."""
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        try:
            await asyncio.wait_for(queue.put(item), self.limits.slow_client_timeout_s)
        except asyncio.TimeoutError:
            raise _SlowClient() from None

    async def _put_or_abort(self, queue: asyncio.Queue, item: ChoiceEvent | BaseException | None) -> None:
        try:
            await self._put(queue, item)
        except _SlowClient:
            self._abort_slow_client(queue)

    def _abort_slow_client(self, queue: asyncio.Queue) -> None:
        """The client stopped reading: cancel every other choice (closing its decode stream),
        drop what is buffered, and leave the consumer one error to read."""
        if self.slow_client:
            return
        self.slow_client = True
        self.metrics.slow_client_abort()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        while not queue.empty():
            queue.get_nowait()
        limits = self.limits
        error = slow_client_aborted(limits.max_buffered_events, limits.slow_client_timeout_s)
        queue.put_nowait(error)
        if self._on_slow_client is not None:
            self._on_slow_client(error)


class _SlowClient(Exception):
    """The client's buffer stayed full for longer than the bound (handled inside `Generation`)."""
