"""Quantized serving, KV rows: an FP8 KV cache against the model's dtype (`make bench` section).

Measured in process on the bench model in bfloat16 (no servers, so the section stays short):
1. KV bytes per token, from the engines' cache specs.
2. Hand-off seconds of a 2048-token prompt: a prefill engine holds the prompt's blocks; pack
   them (the transports' wire buffer, KVBlockStore.pack) plus an xxh64 checksum, and unpack into
   a decode engine's blocks. Median of interleaved rounds. Goal: fp8 / bf16 <= 0.55.
3. Maximum concurrent sequences at one KV budget: the pool's blocks / blocks of one
   512-token sequence. Goal: fp8 / bf16 >= 1.9.
4. Decode tokens/s at concurrency 32 (32 prompts of 64 tokens, 32 greedy tokens each).
5. Teacher-forced quality (`teacher_forced_quality`): the fp8 engine's greedy tokens scored by
   the unquantized engine. Goals from issue 18: argmax agreement >= 0.85, mean |logprob
   difference| of the chosen tokens <= 0.1.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xxhash

from tandem.engine import Engine, SamplingParams
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Direction, Figure, Section

AGREEMENT_GOAL = 0.85
LOGPROB_ERROR_GOAL = 0.1
BYTES_RATIO_GOAL = 0.55
CONCURRENCY_GOAL = 1.9


@dataclass(frozen=True)
class Quality:
    """Teacher-forced closeness of a quantized engine's greedy output to a reference engine."""

    num_tokens: int
    argmax_agreement: float  # fraction of positions where the reference's argmax is the token
    mean_abs_logprob_error: float  # mean |logprob_quantized - logprob_reference| of the tokens


def teacher_forced_quality(
    quantized: Engine, reference: Engine, prompts: Sequence[Sequence[int]], max_tokens: int
) -> Quality:
    """Generate greedily with `quantized` (keeping each token's logprob), then run prompt +
    generated tokens through `reference` with prompt logits, and compare at the generated
    positions. Free-running agreement would not measure closeness: random models diverge
    after the first differing token under any KV quantization."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    outputs = quantized.generate(prompts, sampling)
    scoring = SamplingParams(max_tokens=1, temperature=0.0, return_prompt_logits=True)
    rescored = reference.generate([list(o.prompt_token_ids) + list(o.token_ids) for o in outputs], scoring)
    agree, errors = 0, []
    for out, ref in zip(outputs, rescored):
        assert out.logprobs is not None and ref.prompt_logits is not None
        n = len(out.prompt_token_ids)
        rows = torch.log_softmax(ref.prompt_logits[n - 1 : n - 1 + len(out.token_ids)], dim=-1)
        for row, token, logprob in zip(rows, out.token_ids, out.logprobs):
            agree += int(int(row.argmax()) == token)
            errors.append(abs(logprob.logprob - float(row[token])))
    return Quality(len(errors), agree / len(errors), sum(errors) / len(errors))
