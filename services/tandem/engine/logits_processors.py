"""Sampling controls as logits processors: bad words, logit bias, min_tokens, penalties.

Who calls it: `Sampler.sample`, on the prefill worker's first token and on every later token
of a decode worker alike, before temperature, top-k, top-p and greedy argmax. Each row
depends only on its own request's parameters and token history, so the result is
batch-invariant. Logprobs are not taken from these processed logits: as vLLM's default
(`logprobs_mode="raw_logprobs"`), reported logprobs are the model's raw log-softmax.

Order and formulas are vLLM v1's (`vllm/v1/sample/sampler.py`, `apply_logits_processors`):
1. bad words (`vllm/v1/sample/ops/bad_words.py`): for each bad word w (token ids), if the
   output so far ends with w[:-1], the logit of w[-1] becomes -inf. Only output tokens count.
2. logit bias: `logits[t] += bias`.
3. min_tokens: while fewer than `min_tokens` tokens were generated, the logits of EOS and of
   `stop_token_ids` become -inf (EOS even with `ignore_eos`, as vLLM's `all_stop_token_ids`).
4. penalties (`vllm/model_executor/layers/utils.py`, `apply_penalties`):
   repetition: for tokens in the prompt or the output, `l / r` if `l > 0` else `l * r`;
   frequency: `l -= f * count_in_output(t)`; presence: `l -= p * (count_in_output(t) > 0)`.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tandem.common.request import SamplingParams


@dataclass(frozen=True)
class TokenHistory:
    """What one row's processors read: its prompt and the tokens generated so far."""

    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]


def apply_controls(
    logits: torch.Tensor,  # float32 [num_rows, vocab]; not modified
    params: Seq[SamplingParams],
    histories: Seq[TokenHistory],
    eos_token_ids: frozenset[int],
) -> torch.Tensor:
    """The processed logits of every row (a new tensor; rows without controls are copied)."""
    out = logits.clone()
    for row, (p, history) in enumerate(zip(params, histories)):
        if p.has_controls:
            process_row(out[row], p, history, eos_token_ids)
    return out


def process_row(logits: torch.Tensor, p: SamplingParams, history: TokenHistory, eos_token_ids: frozenset[int]) -> None:
    """Apply every control of `p` to one row (`logits`: float32 [vocab]) in place."""
    vocab = logits.numel()
    output = list(history.output_token_ids)
    for word in p.bad_words_token_ids:
        if len(word) <= len(output) + 1 and word[-1] < vocab:
            prefix = list(word[:-1])
            if not prefix or output[-len(prefix) :] == prefix:
                logits[word[-1]] = float("-inf")
    for token_id, bias in p.logit_bias:
        if token_id < vocab:
            logits[token_id] += bias
    if len(output) < p.min_tokens:
        stops = [t for t in sorted(eos_token_ids | set(p.stop_token_ids)) if 0 <= t < vocab]
        logits[stops] = float("-inf")
    if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        _apply_penalties(logits, p, history)


def _apply_penalties(logits: torch.Tensor, p: SamplingParams, history: TokenHistory) -> None:
    vocab = logits.numel()
    output = torch.tensor([t for t in history.output_token_ids if t < vocab], dtype=torch.int64)
    counts = torch.bincount(output, minlength=vocab).to(logits.dtype)  # [vocab]
    if p.repetition_penalty != 1.0:
        prompt = torch.tensor([t for t in history.prompt_token_ids if t < vocab], dtype=torch.int64)
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[prompt] = True
        seen |= counts > 0
        penalty = torch.where(seen, p.repetition_penalty, 1.0)  # [vocab]
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    if p.frequency_penalty:
        logits -= p.frequency_penalty * counts
    if p.presence_penalty:
        logits -= p.presence_penalty * (counts > 0).to(logits.dtype)
