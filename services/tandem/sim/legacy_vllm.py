"""vLLM 0.1.7's step planning: the colocated baseline DistServe measured, on the step model's counters.

Source: the vLLM DistServe's artifact builds as its baseline (`evaluation/Dockerfile.evaluation`
clones github.com/interestingLSY/vllm, branch `distserve-baseline-vllm`: vLLM 0.1.7 plus token
timestamps), files `vllm/core/scheduler.py` (`Scheduler._schedule`), `vllm/core/block_manager.py`
and `vllm/core/policy.py` (FCFS). Each step is one of two kinds, never both:
1. A prompt step, whenever nothing is swapped and a waiting sequence can be admitted. Waiting
   sequences are taken in queue order while
   - the pool keeps its watermark after allocating the whole sequence (`can_allocate`:
     free - needed >= int(0.01 x pool blocks)),
   - the step's tokens stay within `max_num_batched_tokens` (whole prompts: no chunking),
   - the running sequences stay within `max_num_seqs`.
   The step is those prompts alone; the running batch does not decode during it.
2. Otherwise a decode step of every running sequence, oldest arrival first. Each needs a free
   block (`can_append_slot`: one free block per sequence, whether or not it needs a new one);
   while none is free, the newest running sequence is preempted by recompute (its blocks are
   freed, it goes back to the waiting queue and is later prefilled again with its generated
   tokens), or the sequence itself when it is the newest. vLLM puts it at the very front of
   the queue; here it takes its arrival place, which differs only when an older preempted
   sequence is still waiting (then vLLM's order is newest victim first).
Swapping is not modelled: vLLM swaps only groups of several sequences (beam search, n > 1); a
chatbot request is one sequence, so it is always preempted by recompute. A prompt longer than
`max_num_batched_tokens` (vLLM ignores it with a warning) waits forever here; DistServe's
workloads never have one (prompt + output < 2048 against a 16384-token budget).

The project's own batcher (`StepModel`) stays the default; this planner is chosen with
`StepModelConfig(planner=LEGACY_VLLM)` and serves only the paper's baseline (`sim/paper.py`).
"""

from __future__ import annotations

from tandem.common.block_hash import num_blocks_for
from tandem.sim.sequence import Chunk, Plan, SimSeq
from tandem.sim.stepmodel import StepModel

LEGACY_VLLM = "vllm-0.1.7"
WATERMARK = 0.01  # BlockSpaceManager's default watermark, a fraction of the pool's blocks


class LegacyVllmStepModel(StepModel):
    """`StepModel` whose `schedule` plans vLLM 0.1.7's steps (module docstring)."""

    # can_append_slot wants a free block for every sequence, so a decode run stops one block early
    run_spare_blocks = 1

    def reserve(self, seq: SimSeq) -> bool:
        """vLLM 0.1.7 takes no hand-offs: the caller prefills the sequence here instead."""
        return False

    def schedule(self) -> Plan:
        if self.waiting:
            chunks = self._admit_prompts()
            if chunks:
                return Plan(tuple(chunks), (), len(chunks))
        return self._decode()

    def _admit_prompts(self) -> list[Chunk]:
        cfg = self.config
        watermark = int(WATERMARK * cfg.num_blocks)
        chunks: list[Chunk] = []
        tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            need = num_blocks_for(seq.num_tokens, cfg.block_size)
            if self.num_free_blocks - need < watermark:
                break
            if tokens + seq.num_tokens > cfg.max_num_batched_tokens:
                break
            if len(self.running) + 1 > cfg.max_num_seqs:
                break
            self.waiting.pop(0)
            self.num_free_blocks -= need
            seq.num_blocks, seq.num_hit_blocks, seq.num_computed = need, 0, 0
            self.running.append(seq)
            chunks.append(Chunk(seq, seq.num_tokens))
            tokens += seq.num_tokens
        return chunks

    def _decode(self) -> Plan:
        bs = self.config.block_size
        running = self.running
        running.sort(key=_arrival)  # FCFS: the oldest request has the highest priority
        chunks: list[Chunk] = []
        preempted: list[SimSeq] = []
        i = 0
        while i < len(running):
            seq = running[i]
            while self.num_free_blocks < 1 and running[-1] is not seq:
                preempted.append(self._preempt(running.pop()))
            if self.num_free_blocks < 1:
                preempted.append(self._preempt(running.pop()))  # seq itself: nothing left to take
                break
            need = num_blocks_for(seq.num_computed + 1, bs) - seq.num_blocks
            if need > 0:
                seq.num_blocks += need
                self.num_free_blocks -= need
            chunks.append(Chunk(seq, 1))
            i += 1
        return Plan(tuple(chunks), tuple(preempted), 0)


def _arrival(seq: SimSeq) -> int:
    return seq.arrival
