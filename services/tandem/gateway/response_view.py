"""`ResponseView`: one request's OpenAI response bodies, built from its generation's output.

The serving code owns one view per request. It turns the generation's accumulated totals
(non-streaming) or its streamed events (SSE) into the bodies of `responses.py`, and remembers,
per choice, whether its first chunk went out and how long its logprob text is. Choice numbering
and the placement of `prompt_token_ids` / `token_ids` are described in `responses.py`.

With a chat request's `ToolChoice` (tools/choice.py) that reads calls from the output, each
choice's text becomes content and `tool_calls`: whole (`ToolChoice.extract`) or streamed (one
`ToolCallStream` per choice, one chunk per tool-call delta). A choice that made calls and
stopped by itself finishes with "tool_calls".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypedDict

from tandem.common.request import PromptLogprobs, TokenLogprob
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.echo import NO_PROMPT_DISPLAY, PromptDisplay, echo_logprobs, prompt_logprobs_field
from tandem.gateway.responses import (
    ChoiceResult,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    sse,
    usage,
    usage_chunk,
)
from tandem.gateway.tools.choice import ToolChoice
from tandem.gateway.tools.stream import ToolCallStream, call_json, new_call_id


class ChoiceTotalsLike(Protocol):
    """What `ResponseView` reads of a choice's accumulated output (generation.ChoiceTotals)."""

    @property
    def text(self) -> list[str]: ...

    @property
    def token_ids(self) -> list[int]: ...

    @property
    def logprobs(self) -> list[TokenLogprob]: ...

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def cached_tokens(self) -> int: ...


class ChoiceEventLike(Protocol):
    """What `ResponseView` reads of one streamed event (generation.ChoiceEvent, frozen)."""

    @property
    def index(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def token_ids(self) -> tuple[int, ...]: ...

    @property
    def logprobs(self) -> tuple[TokenLogprob, ...]: ...

    @property
    def finish_reason(self) -> str | None: ...


class _ChunkHead(TypedDict):
    """The keyword arguments every chunk of one choice shares."""

    request_id: str
    model: str
    created: int
    index: int


class ResponseView:
    """Bodies of one request. Owned by its handler; `stream_chunks` records per-choice progress."""

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        chat: bool,
        prompts: Sequence[Sequence[int]],
        n: int,
        return_token_ids: bool | None,
        logprob_count: int | None,
        tokenizer: Tokenizer,
        tool_choice: ToolChoice | None = None,
        display: PromptDisplay = NO_PROMPT_DISPLAY,
    ) -> None:
        """`display`: echo and prompt logprobs (echo.py)."""
        self.request_id, self.created, self.model, self.chat = request_id, created, model, chat
        self.prompts = [tuple(p) for p in prompts]
        self.n = n
        self.return_token_ids = bool(return_token_ids)
        self.with_logprobs = logprob_count is not None
        self.tokenizer = tokenizer
        self._started: set[int] = set()
        self._text_offsets: dict[int, int] = {}
        self.tool_choice = tool_choice if tool_choice is not None and tool_choice.reads_calls else None
        self._tool_streams: dict[int, ToolCallStream] = {}
        self.display = display

    def usage(self, totals: Mapping[int, ChoiceTotalsLike]) -> dict[str, Any]:
        """Each prompt counts once, however many choices it has (vLLM); cached: the best choice's."""
        cached = sum(
            min(
                len(prompt),
                max(
                    (totals[p * self.n + i].cached_tokens for i in range(self.n) if p * self.n + i in totals), default=0
                ),
            )
            for p, prompt in enumerate(self.prompts)
        )
        generated = sum(len(t.token_ids) for t in totals.values())
        return usage(sum(len(p) for p in self.prompts), generated, cached)

    def full_response(self, totals: Mapping[int, ChoiceTotalsLike]) -> dict[str, Any]:
        choices = [
            self._with_tool_calls(
                ChoiceResult(
                    index,
                    "".join(t.text),
                    tuple(t.token_ids),
                    tuple(t.logprobs) if self.with_logprobs else None,
                    t.finish_reason,
                    self.prompts[index // self.n],
                )
            )
            for index, t in totals.items()
        ]
        if self.chat:
            body = chat_response(
                request_id=self.request_id,
                model=self.model,
                created=self.created,
                choices=choices,
                usage_body=self.usage(totals),
                tokenizer=self.tokenizer,
                prompt_token_ids=self.prompts[0] if self.return_token_ids else None,
            )
            if self.display.prompt_logprobs:
                first = totals[min(totals)] if totals else None
                lps = _prompt_lps(first)
                body["prompt_logprobs"] = prompt_logprobs_field(self.prompts[0], lps, self.tokenizer)
            return body
        body = completion_response(
            request_id=self.request_id,
            model=self.model,
            created=self.created,
            choices=choices,
            usage_body=self.usage(totals),
            tokenizer=self.tokenizer,
            return_token_ids=self.return_token_ids,
        )
        for choice in body["choices"]:
            self._show_prompt(choice, totals[choice["index"]])
        return body

    def _show_prompt(self, choice: dict[str, Any], t: ChoiceTotalsLike) -> None:
        """Add the echoed prompt and vLLM's prompt_logprobs to one completions choice."""
        prompt = self.prompts[choice["index"] // self.n]
        lps = _prompt_lps(t)
        echo = self.display.echo_texts
        if echo is not None:
            choice["text"] = echo[choice["index"] // self.n] + choice["text"]
            if self.with_logprobs:
                choice["logprobs"] = echo_logprobs(prompt, lps, t.logprobs, self.tokenizer)
        if self.display.prompt_logprobs:
            choice["prompt_logprobs"] = prompt_logprobs_field(prompt, lps, self.tokenizer)

    def usage_chunk(self, totals: Mapping[int, ChoiceTotalsLike]) -> dict[str, Any]:
        return usage_chunk(
            request_id=self.request_id,
            model=self.model,
            created=self.created,
            chat=self.chat,
            usage_body=self.usage(totals),
        )

    def stream_chunks(self, event: ChoiceEventLike) -> list[bytes]:
        """The SSE events for one generation event (possibly none: nothing new to say)."""
        head: _ChunkHead = {
            "request_id": self.request_id,
            "model": self.model,
            "created": self.created,
            "index": event.index,
        }
        first = event.index not in self._started
        self._started.add(event.index)
        prompt = self.prompts[event.index // self.n] if self.return_token_ids and first else None
        token_ids = event.token_ids if self.return_token_ids else None
        report_tokens = bool(event.token_ids) and (self.return_token_ids or self.with_logprobs)
        out: list[dict[str, Any]] = []
        if self.chat:
            if first:
                out.append(chat_chunk(**head, content="", role=True, prompt_token_ids=prompt))
            text, calls, finish_reason = self._tool_deltas(event)
            if text or report_tokens:
                lp = chat_logprobs(event.logprobs, self.tokenizer) if self.with_logprobs else None
                out.append(chat_chunk(**head, content=text, logprobs=lp, token_ids=token_ids))
            out.extend(chat_chunk(**head, content=None, tool_calls=[call]) for call in calls)
            if finish_reason is not None:
                out.append(chat_chunk(**head, content=None, finish_reason=finish_reason))
        elif first and self.display.echo_texts is not None:
            out.append(self._echo_chunk(head, event, prompt, token_ids))
        elif event.text or report_tokens or event.finish_reason is not None or prompt is not None:
            lp = None
            if self.with_logprobs:
                lp = completion_logprobs(event.logprobs, self.tokenizer, self._text_offsets.get(event.index, 0))
                self._text_offsets[event.index] = sum(map(len, lp["tokens"]), self._text_offsets.get(event.index, 0))
            out.append(
                completion_chunk(
                    **head,
                    text=event.text,
                    finish_reason=event.finish_reason,
                    logprobs=lp,
                    token_ids=token_ids,
                    prompt_token_ids=prompt,
                )
            )
        return [sse(chunk) for chunk in out]

    def _with_tool_calls(self, choice: ChoiceResult) -> ChoiceResult:
        """A finished chat choice with its text read for tool calls (unchanged without a tool choice)."""
        if self.tool_choice is None or not self.chat:
            return choice
        parsed = self.tool_choice.extract(choice.text)
        if not parsed.calls:
            return choice
        mistral = self.tool_choice.parser is not None and self.tool_choice.parser.name == "mistral"
        calls = tuple(call_json(call, new_call_id(mistral)) for call in parsed.calls)
        return replace(
            choice, text=parsed.content or "", tool_calls=calls, finish_reason=_finish(choice.finish_reason, True)
        )

    def _tool_deltas(self, event: ChoiceEventLike) -> tuple[str, list[dict[str, Any]], str | None]:
        """One event's content text, tool-call deltas and finish reason (chat)."""
        if self.tool_choice is None:
            return event.text, [], event.finish_reason
        stream = self._tool_streams.setdefault(event.index, ToolCallStream(self.tool_choice))
        delta = stream.push(event.text)
        if event.finish_reason is not None:
            end = stream.finish()
            delta.content += end.content
            delta.tool_calls.extend(end.tool_calls)
        return delta.content, delta.tool_calls, _finish(event.finish_reason, stream.called)

    def _echo_chunk(
        self,
        head: _ChunkHead,
        event: ChoiceEventLike,
        prompt_token_ids: Sequence[int] | None,
        token_ids: Sequence[int] | None,
    ) -> dict[str, Any]:
        """A completions choice's first chunk with echo: the prompt's text (and logprobs) first."""
        assert self.display.echo_texts is not None
        prompt = self.prompts[event.index // self.n]
        lp = None
        if self.with_logprobs:
            lp = echo_logprobs(prompt, _prompt_lps(event), event.logprobs, self.tokenizer)
            self._text_offsets[event.index] = sum(map(len, lp["tokens"]))
        return completion_chunk(
            **head,
            text=self.display.echo_texts[event.index // self.n] + event.text,
            finish_reason=event.finish_reason,
            logprobs=lp,
            token_ids=token_ids,
            prompt_token_ids=prompt_token_ids,
        )


def _finish(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


def _prompt_lps(source: object) -> PromptLogprobs | None:
    """The prompt logprobs a choice's totals or first event carry (generation.py), if any."""
    value = getattr(source, "prompt_logprobs", None)
    return value if isinstance(value, PromptLogprobs) else None
