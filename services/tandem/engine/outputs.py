"""What the engine hands out and holds for others: per-step deltas, finished generations, a
prefill's pinned blocks, a decode's reserved blocks, and the cumulative counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.common.request import FinishReason, PromptLogprobs, TokenLogprob

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the tokens added, and whether it finished.
    `first_scheduled_s` (`time.monotonic()`, when a step first planned a chunk of it) and
    `num_cached_tokens` (prefix-cache hit at admission) are the sequence's, for timings.
    `shed_message` is set (finish reason ABORT) when the request was shed under overload:
    what its client must be told. `error` is set (finish reason ABORT) when the request failed
    before it ran: its grammar did not compile (the message names the problem)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprob, ...]
    finish_reason: FinishReason | None
    first_scheduled_s: float | None = None
    num_cached_tokens: int = 0
    shed_message: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # first output only, when asked (prompt_logprobs.py)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationOutput:
    """A finished request, as returned by `generate`. `token_ids` is empty for `max_tokens=0`."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None
    num_cached_tokens: int
    prompt_logits: torch.Tensor | None  # float32 [num_prompt_tokens, vocab] when asked
    prompt_logprobs: PromptLogprobs | None = None  # when `prompt_logprobs` was asked


@dataclass(frozen=True)
class HeldKV:
    """Prefill role: a finished prompt's blocks, pinned until `release_held`."""

    block_ids: tuple[int, ...]  # block table order
    num_tokens: int  # positions with valid KV (the request's prompt, replayed generated tokens included)
    block_hashes: tuple[int, ...]  # hashes of the full blocks


@dataclass(frozen=True)
class Reservation:
    """Decode role: blocks reserved for a prompt whose KV arrives from a prefill worker.
    `block_ids[:num_cached_blocks]` already hold the KV (local prefix cache); the prompt's
    other full blocks (`missing_block_ids`) must be filled by a pull of the source's blocks
    at the same indices. A partial last block is never pulled: it is recomputed locally
    (`Batcher.commit`), since no block hash vouches for its tokens."""

    request_id: str
    block_ids: tuple[int, ...]
    num_cached_blocks: int
    num_full_blocks: int  # the prompt's full blocks: block_ids[:num_full_blocks]

    @property
    def missing_block_ids(self) -> tuple[int, ...]:
        return self.block_ids[self.num_cached_blocks : self.num_full_blocks]


@dataclass
class EngineStats:
    """Cumulative counters, read by tests, benchmarks and (later) metrics."""

    num_steps: int = 0
    num_computed_tokens: int = 0  # every token run through the model
    num_prompt_tokens_computed: int = 0  # of which prompt positions
    num_prefix_hit_tokens: int = 0  # tokens served from the prefix cache at admission
    num_preemptions: int = 0
    num_generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    # speculative decoding, vLLM's meaning: a draft is one sequence's proposal in one step
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)  # index: draft position 0..k-1
