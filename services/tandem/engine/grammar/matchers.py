"""One xgrammar matcher per constrained sequence: mask before sampling, advance after.

Owner: the engine's step loop. The matcher of a sequence has accepted exactly its output
tokens (`start` replays the tokens produced elsewhere: the prefill worker's first token on a
decode worker). Preemption by recompute keeps every token, so the matcher stays as it is;
nothing here ever rolls back.

Per step, `mask` sets the logits of every token the grammar forbids next to -inf, in the
rows of constrained sequences, before the sampler sees them. So greedy and seeded sampling,
and the logprobs the sampler reports, are those of the masked distribution (as vLLM v1,
which applies the bitmask before its sampler computes logprobs). The model's EOS is allowed
only once the grammar is complete; the matcher terminates when it accepts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import xgrammar as xgr


class GrammarMatchers:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._matchers: dict[str, xgr.GrammarMatcher] = {}
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # int32 [rows, ceil(vocab / 32)]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def start(self, request_id: str, grammar: xgr.CompiledGrammar, output_token_ids: Iterable[int]) -> None:
        """A fresh matcher for `request_id` that has accepted `output_token_ids`. ValueError
        if one of them is not allowed by the grammar."""
        matcher = xgr.GrammarMatcher(grammar)
        for position, token in enumerate(output_token_ids):
            if not matcher.accept_token(token):
                raise ValueError(f"generated token {token} (output position {position}) is not allowed by the grammar")
        self._matchers[request_id] = matcher

    def drop(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def mask(self, logits: torch.Tensor, request_ids: Sequence[str]) -> None:
        """Set to -inf, in place, the logits of the tokens that row i's grammar forbids, for
        every row whose request (`request_ids[i]`) is constrained. logits: [rows, vocab].
        One elementwise op over the whole batch (unconstrained rows allow every token): no
        row gather, which costs far more than the mask on a busy CPU."""
        rows = [(row, self._matchers[rid]) for row, rid in enumerate(request_ids) if rid in self._matchers]
        if not rows:
            return
        if self._bitmask.shape[0] < len(request_ids):
            self._bitmask = xgr.allocate_token_bitmask(len(request_ids), self.vocab_size)
        bitmask = self._bitmask[: len(request_ids)]
        bitmask.fill_(-1)  # every bit set: every token allowed
        for row, matcher in rows:
            matcher.fill_next_token_bitmask(bitmask, row)
        with torch.inference_mode():  # the model's logits are inference tensors
            allowed = allowed_tokens(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
            logits.masked_fill_(~allowed, float("-inf"))

    def accept(self, request_id: str, token: int) -> bool:
        """Advance `request_id`'s matcher by the sampled token; True once it terminated (it
        accepted a stop token after a complete match). False also for an unconstrained id."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        if not matcher.accept_token(token):
            raise RuntimeError(f"request {request_id}: sampled token {token} is not allowed by its grammar")
        return matcher.is_terminated()


def allowed_tokens(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """Unpack xgrammar's bitmask (int32 [rows, words], bit b of word w = token 32 w + b) to a
    bool [rows, width] tensor (width <= 32 * words: the model's vocabulary)."""
    if width > 32 * bitmask.shape[1]:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words covers {32 * bitmask.shape[1]} tokens, not {width}")
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :width].bool()
