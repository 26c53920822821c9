"""What one engine accepts of a new request, and the `Sequence` it makes of one it accepts.

Who calls it: `Engine.add_request` and `Engine.reserve`, on the step loop, after checking the
request id is not active (the engine's own state). It reads only the limits it was built with
(the model's vocabulary and context, the KV pool's size) and mutates nothing: a refused
request raises `ValueError` with a message a client can act on, and an accepted one is a new
WAITING sequence that the caller owns.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

from tandem.common.block_hash import block_extra, num_blocks_for
from tandem.common.request import Request, SamplingParams
from tandem.engine.sequence import Sequence


@dataclass(frozen=True)
class RequestLimits:
    model_id: str  # block hashes are salted with it (block_extra)
    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int  # in the engine's KV pool

    def new_sequence(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        sampling: SamplingParams,
        cache_salt: str | None,
        generated_token_ids: Seq[int],
        hand_off: bool,
        priority: int = 0,
    ) -> Sequence:
        prompt = tuple(int(t) for t in prompt_token_ids)
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        vocab = self.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is out of range [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; the maximum context length is {self.max_model_len} "
                "tokens, which must leave room for at least one generated token"
            )
        max_total = min(len(prompt) + sampling.max_tokens, self.max_model_len)
        if num_blocks_for(max_total, self.block_size) > self.num_blocks:
            raise ValueError(
                f"request needs up to {num_blocks_for(max_total, self.block_size)} KV blocks but the "
                f"pool has {self.num_blocks}; lower max_tokens or raise kv_cache_bytes"
            )
        generated = [int(t) for t in generated_token_ids]
        if any(not 0 <= t < vocab for t in generated):
            raise ValueError(f"generated token ids must be in [0, {vocab})")
        return Sequence(
            request=Request(request_id, prompt, sampling, cache_salt, priority),
            hash_extra=block_extra(self.model_id, cache_salt),
            max_total_tokens=self.max_model_len,
            token_ids=list(prompt) + generated,
            hand_off=hand_off,
        )
