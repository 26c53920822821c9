"""Speculative decoding's part in a step plan: drafts per chunk, the proposer call, and the
blocks given back.

Owner: the batcher (the engine's step loop), which holds one `DraftPlanner` next to its
`Speculator` (spec/speculator.py) and calls it from `schedule`, `update` and admissions. It
reads the batcher's queues only through its arguments, and mutates only the block tables of the
sequences it is given (allocating nothing: it gives blocks back to the pool).

The rule: a running sequence's chunk that catches up with all its tokens also carries k drafts.
Blocks are allocated for positions `< num_computed_tokens + chunk + k` first (preempting as
the batcher does), then the proposer drafts for all such sequences at once, and the chunk
becomes its uncomputed tokens plus the drafts (the budget counts the drafts; blocks for drafts
not proposed are given back at once). `Batcher.update` appends the accepted drafts and the
correction or bonus token, truncated at a stop, leaves `num_computed_tokens` at
`num_tokens - 1` (rejected positions are not computed), frees blocks that only rejected
positions needed and registers only blocks full of accepted tokens. An admission never samples
a sequence that already has generated tokens (its chunk stops one token short), so its next
token comes from a drafting chunk, as it would without the admission (spec/speculator.py
explains why this matters for seeded requests).
"""

from __future__ import annotations

from tandem.common.block_hash import num_blocks_for
from tandem.engine.block_pool import BlockPool
from tandem.engine.sequence import Sequence
from tandem.engine.spec.speculator import Speculator
from tandem.engine.step_plan import BatcherConfig, ScheduledChunk


class DraftPlanner:
    def __init__(self, config: BatcherConfig, pool: BlockPool, speculator: Speculator | None) -> None:
        self.config = config
        self.pool = pool
        self.speculator = speculator

    def step_skipped(self, running: list[Sequence], ready: list[Sequence], waiting: list[Sequence]) -> bool:
        """The per-step skip rule (spec/skip.py) over the tokens this step computes without
        drafts: the running sequences' chunks and the queued ones that may be admitted."""
        if self.speculator is None:
            return True
        cap = self.config.max_prefill_chunk_tokens or self.config.max_num_batched_tokens
        admissible = (ready + waiting)[: max(0, self.config.max_num_seqs - len(running))]
        num_tokens = sum(min(s.num_new_tokens, cap) for s in running + admissible)
        return self.speculator.skip_step(len(running), min(num_tokens, self.config.max_num_batched_tokens))

    def num_drafts(self, seq: Sequence, n: int, budget: int, step_skipped: bool) -> int:
        if self.speculator is None or n == 0 or n != seq.num_new_tokens:
            return 0
        bs = self.config.block_size
        free_positions = (len(seq.block_table) + self.pool.num_free_blocks) * bs - (seq.num_computed_tokens + n)
        return self.speculator.num_draft_tokens(seq, step_skipped, budget - n, free_positions)

    def propose(self, chunks: list[ScheduledChunk], drafting: list[tuple[int, int]]) -> int:
        """Draft for the planned chunks in `drafting` (one proposer call) and extend them;
        gives back the blocks of positions not drafted. Returns the budget not used."""
        if not drafting:
            return 0
        assert self.speculator is not None
        drafts = self.speculator.propose([chunks[j].seq for j, _ in drafting], [k for _, k in drafting])
        unused = 0
        for (j, k), draft in zip(drafting, drafts):
            seq, n = chunks[j].seq, chunks[j].num_tokens
            num_drafts = len(draft.token_ids)
            unused += k - num_drafts
            if num_drafts:
                chunks[j] = ScheduledChunk(seq, n + num_drafts, draft)
            self.trim(seq, seq.num_computed_tokens + n + num_drafts)
        return unused

    def trim(self, seq: Sequence, num_positions: int) -> None:
        """Free the blocks at the end of `seq`'s table that no position `< num_positions` uses."""
        keep = num_blocks_for(num_positions, self.config.block_size)
        if keep < len(seq.block_table):
            self.pool.free(seq.block_table[keep:][::-1])
            del seq.block_table[keep:]

    def admission_len(self, seq: Sequence, n: int, num_new_tokens: int | None = None) -> int:
        """With speculation, an admitted sequence that has generated tokens stops one token
        short, so that its next token comes from a drafting chunk (module doc)."""
        if self.speculator is None or not self.speculator.may_draft(seq):
            return n
        num_new = seq.num_new_tokens if num_new_tokens is None else num_new_tokens
        return min(n, num_new - 1)
