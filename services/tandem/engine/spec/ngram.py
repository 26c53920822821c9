"""The `ngram` proposer: prompt lookup over the prompt and the tokens generated so far.

As vLLM's n-gram proposer: for n from `prompt_lookup_max` down to `prompt_lookup_min`, take
the sequence's last n tokens (its suffix n-gram) and look for an earlier occurrence of them in
the same sequence. The longest n that occurs wins; among its occurrences we pick the most
recent one (the largest start before the suffix itself), because a model that loops or copies
tends to continue its latest copy. The proposal is the (at most k) tokens that followed that
occurrence; no occurrence of any n gives an empty draft. Each proposal is a point mass on its
token (`Draft.probs` is None).

Cost: numpy over the token list, O(len(tokens) * n) per n and sequence, no torch calls. It has
no state and no KV, so `rollback` and `finish` do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from tandem.engine.spec.proposer import Draft

if TYPE_CHECKING:
    from tandem.engine.sequence import Sequence
    from tandem.engine.spec.config import SpeculativeConfig
    from tandem.engine.spec.proposer import ProposerContext


def propose_ngram(token_ids: Seq[int], min_n: int, max_n: int, num_tokens: int) -> tuple[int, ...]:
    """The tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram (min_n <= n <= max_n) of `token_ids`, at most `num_tokens` of them."""
    if num_tokens <= 0:
        return ()
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # windows starting at 0 .. length-1-n: every n-gram that starts before the suffix
        windows = sliding_window_view(tokens[: length - 1], n)
        matches = np.flatnonzero((windows == tokens[length - n :]).all(axis=1))
        if len(matches):
            start = int(matches[-1]) + n
            return tuple(int(t) for t in tokens[start : start + num_tokens])
    return ()


class NgramProposer:
    name = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, seqs: Seq[Sequence], num_tokens: Seq[int]) -> list[Draft]:
        return [Draft(propose_ngram(s.token_ids, self.min_n, self.max_n, k)) for s, k in zip(seqs, num_tokens)]

    def rollback(self, request_id: str, num_valid_tokens: int) -> None:
        """Stateless: nothing to drop."""

    def finish(self, request_id: str) -> None:
        """Stateless: nothing to forget."""


def create_ngram_proposer(config: SpeculativeConfig, context: ProposerContext) -> NgramProposer:
    assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
