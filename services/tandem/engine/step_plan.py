"""One engine step's plan: the batcher's limits and what it decides to run this step.

Owner: `Batcher.schedule` builds a `StepPlan` from a `BatcherConfig`; the model runner
executes it, speculative verification reads its chunks, and `Batcher.update` applies its
results. A plan is frozen: nothing changes it after `schedule` returns (the sequences it names
are mutated only by the step loop, as usual).
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.engine.sequence import Sequence
from tandem.engine.spec.proposer import Draft


@dataclass(frozen=True)
class BatcherConfig:
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_prefill_chunk_tokens: int | None


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (drafts included)
    draft: Draft | None = None  # speculative decoding: the chunk ends with these (non-empty) drafts

    @property
    def samples(self) -> bool:
        """True if this chunk catches up with every token, so a new token is sampled."""
        num_drafts = len(self.draft.token_ids) if self.draft is not None else 0
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens + num_drafts


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...]
    num_prefix_hit_tokens: int  # tokens taken from the prefix cache by this step's admissions

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)
