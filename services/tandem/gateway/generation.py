"""One OpenAI request as a set of choices: runs them concurrently and merges their text.

`Generation` turns `prompts x n` into choices (choice index = prompt index * n + i, as vLLM
numbers them). Each choice is one `Pipeline.generate` stream, detokenized incrementally and
cut at stop strings; `events()` yields `ChoiceEvent`s from all choices as they arrive.

Ownership: `events()` owns the choice tasks. When its consumer stops early (client
disconnect, an error, the response closed), the `finally` cancels every task; each task's
pipeline generator is closed in turn, which cancels its decode stream. A choice that meets a
stop string closes its own generator the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from opentelemetry.context import Context

from tandem.common.request import FinishReason, Request, SamplingParams, TokenLogprob
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.detokenize import IncrementalDetokenizer, StopStringMatcher
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.pipeline import Pipeline, StreamError

_FINISH_TEXT = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}
_QUEUE_SIZE = 256  # events buffered per request before the choices wait for the client


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


@dataclass
class ChoiceTotals:
    """Accumulated output of one choice (for non-streaming responses and usage)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0


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
    ) -> None:
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
        self.totals = {c.index: ChoiceTotals() for c in self.choices}
        self.start_s = time.perf_counter()
        self.first_token_s: float | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.totals.values())

    async def events(self) -> AsyncGenerator[ChoiceEvent, None]:
        """Merged events of every choice. Errors before any output are raised as they are
        (an `OpenAIError` becomes an HTTP error); later ones arrive as events with `error`."""
        queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue(_QUEUE_SIZE)
        tasks = [asyncio.create_task(self._run(spec, queue)) for spec in self.choices]
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
        request = Request(f"{self.request_id}-{spec.index}", spec.prompt_token_ids, spec.sampling, self.cache_salt)
        totals = self.totals[spec.index]
        detok = IncrementalDetokenizer(self.tokenizer, spec.prompt_token_ids, self.skip_special_tokens)
        matcher = StopStringMatcher(self.stop, self.include_stop_str)
        generator = self.pipeline.generate(request, self.trace_context)
        last_s = time.perf_counter()
        try:
            async for delta in generator:
                now = time.perf_counter()
                if self.first_token_s is None:
                    self.first_token_s = now
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
                totals.text.append(text)
                totals.token_ids.extend(delta.token_ids)
                totals.logprobs.extend(delta.logprobs)
                totals.finish_reason = finish
                await queue.put(ChoiceEvent(spec.index, text, delta.token_ids, delta.logprobs, finish))
                if finish is not None:
                    break
            else:
                raise StreamError("the generation ended without a finish reason")
        except StreamError as exc:
            await queue.put(ChoiceEvent(spec.index, "", (), (), None, error=str(exc)))
        except Exception as exc:  # before any output: re-raised by events() as it is
            await queue.put(exc)
            return
        finally:
            await generator.aclose()
        await queue.put(None)
