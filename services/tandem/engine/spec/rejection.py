"""Verification of one sequence's draft against the target's logits: which tokens to emit.

Greedy (temperature 0): accept drafts while each equals the argmax of the target row before
it; then emit the argmax at the first mismatch (the correction), or after the last draft (the
bonus). The output is therefore exactly the non-speculative greedy output.

Sampling: rejection sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"). For draft position i, with p the target's distribution at that row and
q the draft's: accept draft token x with probability min(1, p(x) / q(x)); at the first
rejection emit a sample of norm(max(0, p - q)) and stop; when every draft is accepted, emit a
bonus sample of p from the last row. The emitted tokens are distributed exactly as tokens
sampled from p one at a time.

Both p and q are the *processed* distributions, as in vLLM: the request's temperature, then
top-k, then top-p, applied to the target's logits by `sampler.processed_probs` (the very
function the non-speculative sampler uses) and by the proposer to its own (`Draft.probs`).
A proposer without probabilities (n-gram: `Draft.probs` is None) is a point mass: q(x) = 1,
so x is accepted with probability p(x), and the recovery distribution is p with x removed.

Randomness: a seeded request draws the uniform for position j from
`position_generator(seed, j, b"accept")`, the recovery sample from `(seed, j, b"recover")`,
and the bonus from `(seed, j)`, the generator the non-speculative sampler uses at j. Position j
is the index in the sequence of the token being decided, so the output depends only on the
seed, the logits and the draft: not on batch composition or on the worker. Unseeded requests
draw from the engine's generator.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from tandem.common.request import SamplingParams
from tandem.engine.sampler import position_generator, processed_probs, race
from tandem.engine.spec.proposer import Draft


def verify_greedy(logits: torch.Tensor, draft_token_ids: Seq[int]) -> list[int]:
    """`logits` float32 [len(draft) + 1, vocab]: row i predicts the token at draft position i.
    Returns the accepted drafts plus the correction or bonus token."""
    argmax = logits.argmax(dim=-1).tolist()
    out: list[int] = []
    for i, token in enumerate(draft_token_ids):
        if token != argmax[i]:
            break
        out.append(token)
    out.append(argmax[len(out)])
    return out


def verify_sampled(
    logits: torch.Tensor,  # float32 [len(draft) + 1, vocab]
    draft: Draft,
    params: SamplingParams,
    first_position: int,  # index in the sequence of the token at draft position 0
    generator: torch.Generator,  # the engine's, for unseeded requests
) -> list[int]:
    """Rejection sampling (module doc). Returns the accepted drafts plus one more token."""
    out: list[int] = []
    for i, token in enumerate(draft.token_ids):
        position = first_position + i
        p = _normalized(processed_probs(logits[i], params))  # [vocab]
        q_token = 1.0 if draft.probs is None else float(draft.probs[i, token])
        uniform = float(torch.rand((), generator=_generator(params, position, b"accept", generator)))
        if q_token > 0.0 and uniform * q_token < float(p[token]):  # u < p(x) / q(x)
            out.append(token)
            continue
        if draft.probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft.probs[i].float()).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is p itself
            residual = p
        out.append(race(residual, _generator(params, position, b"recover", generator)))
        return out
    position = first_position + len(out)
    p = processed_probs(logits[len(out)], params)
    out.append(race(p, _generator(params, position, b"", generator)))
    return out


def verify(
    logits: torch.Tensor, draft: Draft, params: SamplingParams, first_position: int, generator: torch.Generator
) -> list[int]:
    """The tokens to emit for one sequence: greedy or rejection sampling by its params."""
    if params.is_greedy:
        return verify_greedy(logits, draft.token_ids)
    return verify_sampled(logits, draft, params, first_position, generator)


def _normalized(probs: torch.Tensor) -> torch.Tensor:
    """`processed_probs` leaves top-p's kept mass unnormalised (the race does not care);
    acceptance ratios and the residual need a distribution."""
    return probs / probs.sum()


def _generator(params: SamplingParams, position: int, purpose: bytes, engine: torch.Generator) -> torch.Generator:
    return position_generator(params.seed, position, purpose) if params.seed is not None else engine
