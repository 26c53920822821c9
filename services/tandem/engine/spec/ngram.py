"""The `ngram` proposer: prompt lookup over the prompt and the tokens generated so far.

As vLLM's n-gram proposer: for n from `prompt_lookup_max` down to `prompt_lookup_min`, take
the sequence's last n tokens (its suffix n-gram) and look for an earlier occurrence of them in
the same sequence. The longest n that occurs wins; among its occurrences we pick the most
recent one (the largest start before the suffix itself), because a model that loops or copies
tends to continue its latest copy. The proposal is the (at most k) tokens that followed that
occurrence; no occurrence of any n gives an empty draft. Each proposal is a point mass on its
token (`Draft.probs` is None).

Cost: `propose_ngram` (the rule's plain statement, and the tests' oracle) scans the whole token
list with numpy, O(len(tokens) * n) per n, about 0.1 ms per sequence and step on the bench's
~250-token sequences: as much as a tenth of a decode step of the bench model, paid on every
step, drafted or not. `NgramProposer` keeps instead, per request, an `NgramIndex`: the start
of the latest occurrence of every n-gram (min_n <= n <= max_n) seen so far, extended by the
tokens appended since the last step, so a step costs O(new tokens * (max_n - min_n + 1)) dict
updates and at most max_n - min_n + 1 lookups. A request's token list only grows (a rejected
draft never enters it, a preemption keeps it), so the index never has to forget a token:
`rollback` does nothing and `finish` drops the request's index. No KV, no torch calls.
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


class NgramIndex:
    """One request's n-grams: `propose(token_ids, k)` equals
    `propose_ngram(token_ids, min_n, max_n, k)` as long as each call's `token_ids` extends
    the previous call's (module doc)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        # n-gram (a tuple of n tokens) -> start of its latest occurrence within token_ids[:num_indexed]
        self._latest: dict[tuple[int, ...], int] = {}
        self._num_indexed = 0

    def propose(self, token_ids: Seq[int], num_tokens: int) -> tuple[int, ...]:
        if num_tokens <= 0:
            return ()
        length = len(token_ids)
        # as propose_ngram: the occurrences that lie within token_ids[:length - 1]
        for end in range(self._num_indexed + 1, length):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._latest[tuple(token_ids[end - n : end])] = end - n
        self._num_indexed = max(self._num_indexed, length - 1)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = self._latest.get(tuple(token_ids[length - n :]))
            if start is not None:
                return tuple(token_ids[start + n : start + n + num_tokens])
        return ()


class NgramProposer:
    name = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._indexes: dict[str, NgramIndex] = {}  # request id -> its n-grams

    def propose(self, seqs: Seq[Sequence], num_tokens: Seq[int]) -> list[Draft]:
        drafts = []
        for seq, k in zip(seqs, num_tokens):
            index = self._indexes.get(seq.request_id)
            if index is None:
                index = self._indexes[seq.request_id] = NgramIndex(self.min_n, self.max_n)
            drafts.append(Draft(index.propose(seq.token_ids, k)))
        return drafts

    def rollback(self, request_id: str, num_valid_tokens: int) -> None:
        """Nothing to drop: the index holds only the request's tokens, never a draft."""

    def finish(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)


def create_ngram_proposer(config: SpeculativeConfig, context: ProposerContext) -> NgramProposer:
    assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
