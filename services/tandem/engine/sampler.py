"""Token sampling: greedy, temperature, top-k, top-p, with per-(seed, position) generators.

A seeded request draws its randomness from a generator keyed by (seed, position of the token
being generated), so its output does not depend on batch composition or on which worker
samples which position. Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)),
which is equivalent to drawing from the categorical distribution p.

Sampling controls (penalties, logit bias, min_tokens, bad words: logits_processors.py) are
applied first, when a row has any; reported logprobs are the raw model's (vLLM's default).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence as Seq

import torch
import xxhash

from tandem.common.request import SamplingParams, TokenLogprob
from tandem.engine.logits_processors import TokenHistory, apply_controls


def position_generator(seed: int, position: int, purpose: bytes = b"") -> torch.Generator:
    """A fresh CPU generator for one (seed, position) pair; a non-empty `purpose` (speculative
    decoding: b"accept", b"recover") gives an independent stream for the same position."""
    key = xxhash.xxh64_intdigest(struct.pack("<qq", seed, position) + purpose) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(key)


def processed_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: `logits` [vocab] / temperature, then top-k,
    then top-p (float32 [vocab]). Speculative verification uses the same function."""
    scaled = logits / p.temperature  # [vocab]
    if p.top_k is not None and p.top_k < scaled.numel():
        kth = scaled.topk(p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def race(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token from `probs` [vocab] (unnormalised is fine) by the exponential race."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


class Sampler:
    """Owned by the engine. `sample` is pure apart from the engine-level generator that
    unseeded requests draw from."""

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,  # float32 [num_rows, vocab]
        params: Seq[SamplingParams],
        positions: Seq[int],  # index in the sequence of the token each row generates
        histories: Seq[TokenHistory] = (),  # each row's tokens, for the sampling controls
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = logits.float().cpu()
        processed = logits
        if any(p.has_controls for p in params):
            processed = apply_controls(logits, params, histories, eos_token_ids)
        tokens = processed.argmax(dim=-1).tolist()
        for row, (p, position) in enumerate(zip(params, positions)):
            if not p.is_greedy:
                tokens[row] = self._sample_row(processed[row], p, position)
        return tokens, token_logprobs(logits, tokens, params)

    @property
    def generator(self) -> torch.Generator:
        """The engine-level generator that unseeded requests draw from."""
        return self._generator

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, position: int) -> int:
        generator = position_generator(p.seed, position) if p.seed is not None else self._generator
        return race(processed_probs(logits, p), generator)


def token_logprobs(
    logits: torch.Tensor,  # float32 [num_rows, vocab]
    tokens: Seq[int],  # the token chosen at each row
    params: Seq[SamplingParams],
) -> list[TokenLogprob | None]:
    """Each row's chosen-token logprob and top alternatives (raw logits, as vLLM), or None
    where the request did not ask for logprobs."""
    logprobs: list[TokenLogprob | None] = [None] * len(tokens)
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        log_probs = torch.log_softmax(logits[wanted], dim=-1)
        for i, row in enumerate(wanted):
            top: tuple[tuple[int, float], ...] = ()
            k = params[row].logprobs or 0
            if k:
                values, ids = log_probs[i].topk(k)
                # tokens masked to -inf (a grammar forbids them) are never alternatives
                top = tuple((t, v) for t, v in zip(ids.tolist(), values.tolist()) if v != float("-inf"))
            logprobs[row] = TokenLogprob(tokens[row], float(log_probs[i, tokens[row]]), top)
    return logprobs
