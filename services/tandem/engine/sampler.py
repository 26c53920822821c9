"""Token sampling: greedy, temperature, top-k, top-p, with per-(seed, position) generators.

A seeded request draws its randomness from a generator keyed by (seed, position of the token
being generated), so its output does not depend on batch composition or on which worker
samples which position. Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)),
which is equivalent to drawing from the categorical distribution p.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence as Seq

import torch
import xxhash

from tandem.common.request import SamplingParams, TokenLogprob


def position_generator(seed: int, position: int) -> torch.Generator:
    """A fresh CPU generator for one (seed, position) pair."""
    key = xxhash.xxh64_intdigest(struct.pack("<qq", seed, position)) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(key)


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
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = logits.float().cpu()
        tokens = logits.argmax(dim=-1).tolist()
        for row, (p, position) in enumerate(zip(params, positions)):
            if not p.is_greedy:
                tokens[row] = self._sample_row(logits[row], p, position)
        logprobs: list[TokenLogprob | None] = [None] * len(tokens)
        wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            log_probs = torch.log_softmax(logits[wanted], dim=-1)
            for i, row in enumerate(wanted):
                top: tuple[tuple[int, float], ...] = ()
                k = params[row].logprobs or 0
                if k:
                    values, ids = log_probs[i].topk(k)
                    top = tuple(zip(ids.tolist(), values.tolist()))
                logprobs[row] = TokenLogprob(tokens[row], float(log_probs[i, tokens[row]]), top)
        return tokens, logprobs

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, position: int) -> int:
        probs = processed_probs(logits, p)
        generator = position_generator(p.seed, position) if p.seed is not None else self._generator
        return sample_from(probs, generator)


def processed_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled (temperature > 0) request draws from: float32 logits
    `[vocab]` scaled by the temperature, top-k, softmax, then top-p. Unnormalised after
    top-p: the kept probabilities keep their values (the exponential race does not need a
    normalised distribution). Also the draft model's proposal distribution."""
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


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from `probs` `[vocab]` (any non-negative weights) by the exponential race."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())
