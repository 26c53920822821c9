"""Response bodies and SSE chunks of the OpenAI API, as plain dicts in OpenAI's shapes.

The pure builders (`completion_response`, `chat_response`, `completion_chunk`, `chat_chunk`,
`usage`, `usage_chunk`, the logprobs formatters, `models_response`) know nothing of the
request's lifecycle. `ResponseView` is the per-request adapter the app uses: it turns the
generation's accumulated totals or streamed events into those bodies and remembers, per
choice, whether its first chunk went out and how long its logprob text is.

Choice numbering (vLLM's): with prompts p = 0.. and n choices each, choice index = p * n + i.
`return_token_ids` (vLLM extension) adds `token_ids` to each choice; `prompt_token_ids` goes on
the choice for completions (first chunk when streaming) and at the top level for chat (on the
role chunk of each choice when streaming), as vLLM does. Logprob values are clamped to -9999.0
(vLLM's value) because JSON cannot carry -Infinity.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tandem.common.request import TokenLogprob
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.detokenize import token_bytes, token_text

SSE_DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0
OWNED_BY = "tandem"


@dataclass(frozen=True)
class ChoiceResult:
    """One finished choice. `logprobs=None`: not requested. `prompt_token_ids`: completions only."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    prompt_token_ids: tuple[int, ...] = ()


# Characters that JSON leaves raw but that line splitters built on str.splitlines (httpx's
# aiter_lines, for one) treat as line ends, cutting an event in two. SSE itself ends lines only
# at CR or LF, so escaping them changes nothing for a correct client.
_LINE_BREAKING = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_json(obj: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON that never contains a character any client may split a line at."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKING).encode("utf-8")


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event: `data: <compact JSON>\\n\\n`."""
    return b"data: " + sse_json(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def completion_logprobs(logprobs: Sequence[TokenLogprob], tokenizer: Tokenizer, text_offset: int = 0) -> dict[str, Any]:
    """Legacy completions logprobs; `top_logprobs` maps token text to logprob, sampled token first."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = token_text(tokenizer, lp.token_id)
        top = {text: _clamp(lp.logprob)}
        for token_id, value in lp.top:
            top.setdefault(token_text(tokenizer, token_id), _clamp(value))
        tokens.append(text)
        values.append(_clamp(lp.logprob))
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(logprobs: Sequence[TokenLogprob], tokenizer: Tokenizer) -> dict[str, Any]:
    """Chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""

    def entry(token_id: int, value: float) -> dict[str, Any]:
        return {
            "token": token_text(tokenizer, token_id),
            "logprob": _clamp(value),
            "bytes": list(token_bytes(tokenizer, token_id)),
        }

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs
        ]
    }


def completion_response(
    *,
    request_id: str,
    model: str,
    created: int,
    choices: Sequence[ChoiceResult],
    usage_body: Mapping[str, Any],
    tokenizer: Tokenizer,
    return_token_ids: bool,
) -> dict[str, Any]:
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        lp = None if c.logprobs is None else completion_logprobs(c.logprobs, tokenizer)
        choice = {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}
        if return_token_ids:
            choice.update(prompt_token_ids=list(c.prompt_token_ids), token_ids=list(c.token_ids))
        out.append(choice)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": out,
        "usage": dict(usage_body),
    }


def chat_response(
    *,
    request_id: str,
    model: str,
    created: int,
    choices: Sequence[ChoiceResult],
    usage_body: Mapping[str, Any],
    tokenizer: Tokenizer,
    prompt_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """`prompt_token_ids` not None means return_token_ids: it goes top-level, token_ids per choice."""
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        lp = None if c.logprobs is None else chat_logprobs(c.logprobs, tokenizer)
        choice = {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": lp,
            "finish_reason": c.finish_reason,
        }
        if prompt_token_ids is not None:
            choice["token_ids"] = list(c.token_ids)
        out.append(choice)
    body = {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": out,
        "usage": dict(usage_body),
    }
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = list(prompt_token_ids)
    return body


def completion_chunk(
    *,
    request_id: str,
    model: str,
    created: int,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: Mapping[str, Any] | None = None,
    token_ids: Sequence[int] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One streamed completions chunk; `logprobs` is already formatted (`completion_logprobs`)."""
    choice: dict[str, Any] = {
        "index": index,
        "text": text,
        "logprobs": None if logprobs is None else dict(logprobs),
        "finish_reason": finish_reason,
    }
    if prompt_token_ids is not None:
        choice["prompt_token_ids"] = list(prompt_token_ids)
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return _chunk("text_completion", request_id, model, created, [choice])


def chat_chunk(
    *,
    request_id: str,
    model: str,
    created: int,
    index: int,
    content: str | None,
    role: bool = False,
    finish_reason: str | None = None,
    logprobs: Mapping[str, Any] | None = None,
    token_ids: Sequence[int] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One streamed chat chunk. A choice's first chunk is `role=True, content=""`, its text chunks
    `content=text`, its last `content=None, finish_reason=...` (empty delta)."""
    delta: dict[str, Any] = {"role": "assistant", "content": content or ""} if role else {}
    if content is not None and not role:
        delta["content"] = content
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": None if logprobs is None else dict(logprobs),
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    body = _chunk("chat.completion.chunk", request_id, model, created, [choice])
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = list(prompt_token_ids)
    return body


def usage_chunk(
    *, request_id: str, model: str, created: int, chat: bool, usage_body: Mapping[str, Any]
) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the whole usage."""
    body = _chunk("chat.completion.chunk" if chat else "text_completion", request_id, model, created, [])
    body["usage"] = dict(usage_body)
    return body


def models_response(model_id: str, max_model_len: int, created: int, root: str | None = None) -> dict[str, Any]:
    """GET /v1/models: the one served model."""
    return {
        "object": "list",
        "data": [
            {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": OWNED_BY,
                "root": root or model_id,
                "max_model_len": max_model_len,
            }
        ],
    }


class ChoiceTotalsLike(Protocol):
    """What `ResponseView` reads of a choice's accumulated output (generation.ChoiceTotals)."""

    text: list[str]
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    cached_tokens: int


class ChoiceEventLike(Protocol):
    """What `ResponseView` reads of one streamed event (generation.ChoiceEvent)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None


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
    ) -> None:
        self.request_id, self.created, self.model, self.chat = request_id, created, model, chat
        self.prompts = [tuple(p) for p in prompts]
        self.n = n
        self.return_token_ids = bool(return_token_ids)
        self.with_logprobs = logprob_count is not None
        self.tokenizer = tokenizer
        self._started: set[int] = set()
        self._text_offsets: dict[int, int] = {}

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
            ChoiceResult(
                index,
                "".join(t.text),
                tuple(t.token_ids),
                tuple(t.logprobs) if self.with_logprobs else None,
                t.finish_reason,
                self.prompts[index // self.n],
            )
            for index, t in totals.items()
        ]
        head = {
            "request_id": self.request_id,
            "model": self.model,
            "created": self.created,
            "usage_body": self.usage(totals),
            "tokenizer": self.tokenizer,
        }
        if self.chat:
            return chat_response(
                **head, choices=choices, prompt_token_ids=self.prompts[0] if self.return_token_ids else None
            )
        return completion_response(**head, choices=choices, return_token_ids=self.return_token_ids)

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
        head = {"request_id": self.request_id, "model": self.model, "created": self.created, "index": event.index}
        first = event.index not in self._started
        self._started.add(event.index)
        prompt = self.prompts[event.index // self.n] if self.return_token_ids and first else None
        token_ids = event.token_ids if self.return_token_ids else None
        report_tokens = bool(event.token_ids) and (self.return_token_ids or self.with_logprobs)
        out: list[dict[str, Any]] = []
        if self.chat:
            if first:
                out.append(chat_chunk(**head, content="", role=True, prompt_token_ids=prompt))
            if event.text or report_tokens:
                lp = chat_logprobs(event.logprobs, self.tokenizer) if self.with_logprobs else None
                out.append(chat_chunk(**head, content=event.text, logprobs=lp, token_ids=token_ids))
            if event.finish_reason is not None:
                out.append(chat_chunk(**head, content=None, finish_reason=event.finish_reason))
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


def _chunk(obj: str, request_id: str, model: str, created: int, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }


def _clamp(value: float) -> float:
    return value if value >= MIN_LOGPROB else MIN_LOGPROB  # NaN too
