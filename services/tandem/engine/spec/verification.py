"""The engine's side of a verification step: emitted tokens, their logprobs, the counters.

Owner: the engine's step loop, between the model runner and `Batcher.update`. Each chunk with
a draft has target logits for its last uncomputed token and each draft; `rejection.verify`
picks the tokens to emit, and their logprobs come from the same rows that the
non-speculative sampler would have used at those positions (`sampler.token_logprobs`), so
they equal the non-speculative values. The counters are vLLM's (a draft is one sequence's
non-empty proposal in one step); `spec_accepted_per_position[i]` counts drafts whose
position i was accepted.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tandem.common.request import TokenLogprob
from tandem.engine.outputs import EngineStats
from tandem.engine.sampler import token_logprobs
from tandem.engine.spec.adaptive import update_acceptance
from tandem.engine.spec.rejection import verify
from tandem.engine.step_plan import ScheduledChunk


def verify_chunks(
    chunks: Iterable[ScheduledChunk],
    verify_logits: dict[str, torch.Tensor],
    generator: torch.Generator,
    stats: EngineStats,
) -> dict[str, list[tuple[int, TokenLogprob | None]]]:
    """For every chunk with a draft: (token, logprob) for each token to emit, in order.
    Updates `stats` and each sequence's acceptance estimate."""
    verified: dict[str, list[tuple[int, TokenLogprob | None]]] = {}
    for chunk in chunks:
        if chunk.draft is None:
            continue
        seq, draft = chunk.seq, chunk.draft
        logits = verify_logits[seq.request_id]  # [1 + len(draft), vocab]
        tokens = verify(logits, draft, seq.sampling, seq.num_tokens, generator)
        logprobs = token_logprobs(logits[: len(tokens)], tokens, [seq.sampling] * len(tokens))
        verified[seq.request_id] = list(zip(tokens, logprobs))
        num_drafts, num_accepted = len(draft.token_ids), len(tokens) - 1
        stats.spec_num_drafts += 1
        stats.spec_num_draft_tokens += num_drafts
        stats.spec_num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.spec_accepted_per_position[position] += 1
        seq.spec_acceptance = update_acceptance(seq.spec_acceptance, num_drafts, num_accepted)
    return verified
