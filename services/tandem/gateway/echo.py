"""How a response shows its prompt: completions' `echo`, and vLLM's `prompt_logprobs` field.

Who calls it: `response_view.ResponseView`, which adds these to the bodies of responses.py.

- `echo` (completions): the prompt's text comes before the choice's text (its first chunk
  when streaming). With `logprobs`, the prompt's tokens come first in `tokens`,
  `token_logprobs`, `top_logprobs` and `text_offset`; the first prompt token has no logprob
  (`null` in `token_logprobs` and `top_logprobs`), as in vLLM and OpenAI. Offsets count the
  token texts from 0, the prompt's included.
- `prompt_logprobs` (vLLM's extra, completions per choice and chat at the top level): one
  entry per prompt token, `null` for the first; each maps token id (a JSON string) to
  `{"logprob", "rank", "decoded_token"}`, the prompt token first, then its top alternatives
  (ranks 1..k). Logprobs are the model's raw log-softmax, clamped to -9999.0 for JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from tandem.common.request import PromptLogprobs, TokenLogprob
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.bodies import CompletionRequest
from tandem.gateway.detokenize import token_text
from tandem.gateway.protocol import PreparedRequest
from tandem.gateway.responses import MIN_LOGPROB, completion_logprobs


@dataclass(frozen=True)
class PromptDisplay:
    """What a response shows of its prompts: `echo_texts[p]` is prompt p's echoed text (None:
    no echo); `prompt_logprobs` adds vLLM's field."""

    echo_texts: tuple[str, ...] | None = None
    prompt_logprobs: bool = False


NO_PROMPT_DISPLAY = PromptDisplay()  # neither echo nor prompt logprobs


def echo_logprobs(
    prompt_token_ids: Sequence[int],
    prompt_logprobs: PromptLogprobs | None,
    generated: Sequence[TokenLogprob],
    tokenizer: Tokenizer,
) -> dict[str, Any]:
    """Completions logprobs of the prompt then the generated tokens, offsets from 0."""
    head = token_text(tokenizer, prompt_token_ids[0])
    scored = list(prompt_logprobs.logprobs) if prompt_logprobs is not None else []
    unscored = [token_text(tokenizer, t) for t in prompt_token_ids[1 : len(prompt_token_ids) - len(scored)]]
    texts = [head, *unscored]  # tokens without a logprob: the first (and all, if none came)
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    rest = completion_logprobs([*scored, *generated], tokenizer, sum(len(t) for t in texts))
    return {
        "tokens": texts + rest["tokens"],
        "token_logprobs": [None] * len(texts) + rest["token_logprobs"],
        "top_logprobs": [None] * len(texts) + rest["top_logprobs"],
        "text_offset": offsets + rest["text_offset"],
    }


def prompt_logprobs_field(
    prompt_token_ids: Sequence[int], prompt_logprobs: PromptLogprobs | None, tokenizer: Tokenizer
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs` value; None when the worker sent none."""
    if prompt_logprobs is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = [None] * (len(prompt_token_ids) - len(prompt_logprobs.logprobs))
    for lp, rank in zip(prompt_logprobs.logprobs, prompt_logprobs.ranks):
        entry = {str(lp.token_id): _entry(lp.logprob, rank, lp.token_id, tokenizer)}
        for r, (token_id, value) in enumerate(lp.top, start=1):
            entry.setdefault(str(token_id), _entry(value, r, token_id, tokenizer))
        out.append(entry)
    return out


def _entry(logprob: float, rank: int, token_id: int, tokenizer: Tokenizer) -> dict[str, Any]:
    return {
        "logprob": logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB,
        "rank": rank,
        "decoded_token": token_text(tokenizer, token_id),
    }


def prompt_display(prepared: PreparedRequest, tokenizer: Tokenizer) -> PromptDisplay:
    """What the response to `prepared` shows of its prompts. Echo (completions only) repeats
    a string prompt as sent, and a token-id prompt as its decoded text."""
    body = prepared.body
    shows_logprobs = any(c.sampling.prompt_logprobs is not None for c in prepared.choices)
    if not isinstance(body, CompletionRequest) or not body.echo:
        return PromptDisplay(None, shows_logprobs)
    if isinstance(body.prompt, str):
        texts: tuple[str, ...] = (body.prompt,)
    elif all(isinstance(p, str) for p in body.prompt):
        texts = tuple(cast("list[str]", body.prompt))
    else:
        texts = tuple(tokenizer.decode(ids, skip_special_tokens=False) for ids in prepared.prompts)
    return PromptDisplay(texts, shows_logprobs)
