"""The sampling controls of a request body as `SamplingParams` fields (vLLM's semantics).

Who calls it: `protocol.prepare`, once per request, after the body validated its own ranges
(bodies.py: penalties in [-2, 2], repetition_penalty > 0, logit_bias values in [-100, 100],
min_tokens >= 0, prompt_logprobs in [0, 20]). What needs the model is checked here, each a 400
naming the parameter: logit_bias token ids in the vocabulary, min_tokens <= max_tokens, and
bad words that tokenize to ids in the vocabulary.

Bad words are tokenized as vLLM does (`SamplingParams.update_from_tokenizer`): each word,
stripped of leading spaces, without special tokens, and again with one leading space; the
second form is kept only when its first token differs from the first form's and it has the
same number of tokens (so a word is banned both at the start of a text and after a space).
"""

from __future__ import annotations

from typing import Any

from tandem.common.codec import MAX_BAD_WORD_TOKENS
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.bodies import ChatCompletionRequest, CompletionRequest
from tandem.gateway.errors import bad_request


def sampling_controls(
    req: CompletionRequest | ChatCompletionRequest, tokenizer: Tokenizer, vocab_size: int, max_tokens: int
) -> dict[str, Any]:
    """The `SamplingParams` keyword arguments of the body's controls (only those it sets)."""
    controls: dict[str, Any] = {}
    if req.presence_penalty:
        controls["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty:
        controls["frequency_penalty"] = req.frequency_penalty
    if req.repetition_penalty is not None:
        controls["repetition_penalty"] = req.repetition_penalty
    if req.logit_bias:
        controls["logit_bias"] = logit_bias(req.logit_bias, vocab_size)
    if req.min_tokens:
        if req.min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {req.min_tokens}.",
                "min_tokens",
            )
        controls["min_tokens"] = req.min_tokens
    if req.bad_words:
        controls["bad_words_token_ids"] = bad_words_token_ids(req.bad_words, tokenizer, vocab_size)
    prompt_logprobs = requested_prompt_logprobs(req)
    if prompt_logprobs is not None:
        controls["prompt_logprobs"] = prompt_logprobs
    return controls


def requested_prompt_logprobs(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    """vLLM's: the body's `prompt_logprobs`, or for completions with `echo`, `logprobs`."""
    if req.prompt_logprobs is not None:
        return req.prompt_logprobs
    if isinstance(req, CompletionRequest) and req.echo:
        return req.logprobs
    return None


def logit_bias(bias: dict[str, float], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs sorted by id; the body already checked that keys are integers."""
    pairs = sorted((int(key), value) for key, value in bias.items())
    invalid = [t for t, _ in pairs if not 0 <= t < vocab_size]
    if invalid:
        raise bad_request(
            f"token_id(s) {invalid} in logit_bias contain out-of-vocab token ids. Vocabulary size: {vocab_size}",
            "logit_bias",
        )
    if len({t for t, _ in pairs}) != len(pairs):
        raise bad_request("logit_bias names a token id twice.", "logit_bias")
    return tuple(pairs)


def bad_words_token_ids(words: list[str], tokenizer: Tokenizer, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if not plain:
            raise bad_request(f"bad word {word!r} has no tokens.", "bad_words")
        out.append(tuple(plain))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(tuple(spaced))
    if sum(map(len, out)) > MAX_BAD_WORD_TOKENS:
        raise bad_request(f"bad_words tokenize to more than {MAX_BAD_WORD_TOKENS} token ids.", "bad_words")
    invalid = sorted({t for word in out for t in word if t >= vocab_size})
    if invalid:
        raise bad_request(
            f"The model vocabulary size is {vocab_size}, but bad_words tokenized to {invalid}.", "bad_words"
        )
    return tuple(out)
