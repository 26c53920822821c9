"""Response bodies and SSE chunks of the OpenAI API, as plain dicts in OpenAI's shapes.

The builders here (`completion_response`, `chat_response`, `completion_chunk`, `chat_chunk`,
`usage`, `usage_chunk`, the logprobs formatters, `models_response`) are pure and know nothing
of the request's lifecycle; `response_view.ResponseView` is the per-request adapter that
feeds them.

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
from typing import Any

from tandem.common.request import TokenLogprob
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.detokenize import token_bytes, token_text

SSE_DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0
OWNED_BY = "tandem"


@dataclass(frozen=True)
class ChoiceResult:
    """One finished choice. `logprobs=None`: not requested. `prompt_token_ids`: completions only.
    `tool_calls` (chat): the message's calls, OpenAI's shape; with calls, empty text is null content."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    prompt_token_ids: tuple[int, ...] = ()
    tool_calls: tuple[Mapping[str, Any], ...] = ()


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
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        if c.tool_calls:
            message.update(content=c.text or None, tool_calls=[dict(call) for call in c.tool_calls])
        choice = {"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}
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
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """One streamed chat chunk. A choice's first chunk is `role=True, content=""`, its text chunks
    `content=text`, its tool-call chunks `content=None, tool_calls=[delta]` (stream.py's
    shapes), its last `content=None, finish_reason=...` (empty delta)."""
    delta: dict[str, Any] = {"role": "assistant", "content": content or ""} if role else {}
    if content is not None and not role:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = [dict(call) for call in tool_calls]
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
