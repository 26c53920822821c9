"""Appending a step's tokens to a sequence, and whether the sequence stops there.

Who calls it: `Batcher.update`, on the step loop, for each chunk that sampled a token
(`stop_reason`) or verified drafts (`append_verified`). Both mutate only the sequence they
are given; finishing it (and freeing its blocks) stays the batcher's job.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tandem.common.request import FinishReason, TokenLogprob
from tandem.engine.sequence import Sequence


def append_verified(
    seq: Sequence, emitted: Seq[tuple[int, TokenLogprob | None]], eos_token_ids: frozenset[int]
) -> FinishReason | None:
    """Append a verified run up to and including its first stop; the last appended token is
    the only one whose KV is not computed. Returns the stop reason, if any."""
    reason = None
    for token, logprob in emitted:
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        reason = stop_reason(seq, token, eos_token_ids)
        if reason is not None:
            break
    seq.num_computed_tokens = seq.num_tokens - 1
    return reason


def stop_reason(seq: Sequence, token: int, eos_token_ids: frozenset[int]) -> FinishReason | None:
    p = seq.sampling
    if (token in eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
        return FinishReason.STOP
    if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= seq.max_total_tokens:
        return FinishReason.LENGTH
    return None
