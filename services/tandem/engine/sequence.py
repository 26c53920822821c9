"""A worker's mutable state for one request.

Owner: the engine's step loop (batcher and engine); nothing else mutates a sequence.
There are no phases: `num_computed_tokens` counts the tokens whose KV is in the cache, and
whatever remains (`num_new_tokens`) is the work left, whether prompt or generated.

Lifecycle:
1. WAITING: added, holds no blocks (or was preempted and gave them all back).
2. (decode role) RESERVED: owns blocks for its prompt while a KV pull fills them; then
   RUNNING with the whole prompt computed, or back to WAITING to recompute if the pull failed.
3. RUNNING: admitted by the batcher; owns the blocks in `block_table`, the first
   `num_cached_tokens` of them taken from the prefix cache.
4. After each step that catches up with all its tokens, a new token is sampled and appended.
5. FINISHED: stopped (EOS, stop token, max tokens, max length) or aborted; blocks freed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from tandem.common.block_hash import ROOT_PARENT_HASH, BlockHash, hash_blocks
from tandem.common.request import FinishReason, PromptLogprobs, Request, SamplingParams, TokenLogprob
from tandem.engine.outputs import GenerationOutput


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RESERVED = "reserved"  # decode role: owns blocks that a KV pull is filling; not scheduled
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: Request  # what the client asked; never changes
    hash_extra: bytes
    max_total_tokens: int  # prompt + outputs never exceed this (max_model_len)
    hand_off: bool = False  # prefill role: stop after the first token and keep the KV
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0  # prefix-cache hit at the last admission
    num_preemptions: int = 0
    num_cached_blocks: int = 0  # blocks of block_table already registered in the pool's cache
    arrival: int = 0  # order of arrival in the batcher (stamped by `Batcher.add` / `reserve`)
    first_scheduled_s: float | None = None  # time.monotonic() when a step first planned a chunk of it
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # float32 chunks
    # prompt_logprobs: (logprob, rank) of prompt tokens 1.., filled chunk by chunk (prompt_logprobs.py)
    prompt_logprobs: list[tuple[TokenLogprob, int]] = field(default_factory=list)
    spec_acceptance: float | None = None  # speculative decoding: per-token acceptance estimate (spec/adaptive.py)
    _block_hashes: list[BlockHash] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def priority(self) -> int:
        """Lower is more important (`Request.priority`)."""
        return self.request.priority

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_handoff_tokens(self) -> int:
        """Every token but the last: the tokens whose KV crosses a disaggregated hand-off. A
        prefill worker's HANDOFF holds them (the prompt, plus the generated tokens a replay
        came with, but not the first token it sampled); a decode worker's reservation pulls
        them (its last token is the prefill's first token, computed here)."""
        return len(self.token_ids) - 1

    @property
    def num_new_tokens(self) -> int:
        """Tokens whose KV is not computed yet (the work left before the next sample)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def block_hashes(self, block_size: int) -> list[BlockHash]:
        """Chained hashes of every full block of `token_ids`, extended incrementally."""
        done = len(self._block_hashes)
        if (done + 1) * block_size <= len(self.token_ids):
            parent = self._block_hashes[-1] if done else ROOT_PARENT_HASH
            self._block_hashes.extend(hash_blocks(self.token_ids, block_size, self.hash_extra, parent, done))
        return self._block_hashes

    def full_prompt_logprobs(self) -> PromptLogprobs | None:
        """The prompt logprobs, if asked for and computed here in full."""
        if self.sampling.prompt_logprobs is None or len(self.prompt_logprobs) != self.num_prompt_tokens - 1:
            return None
        return PromptLogprobs(tuple(lp for lp, _ in self.prompt_logprobs), tuple(r for _, r in self.prompt_logprobs))

    def generation_output(self) -> GenerationOutput:
        """The finished sequence as `generate()` returns it."""
        assert self.finish_reason is not None
        return GenerationOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=tuple(self.output_token_ids),
            finish_reason=self.finish_reason,
            logprobs=tuple(self.logprobs) if self.sampling.logprobs is not None else None,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logits=torch.cat(self.prompt_logits) if self.prompt_logits else None,
            prompt_logprobs=self.full_prompt_logprobs(),
        )
