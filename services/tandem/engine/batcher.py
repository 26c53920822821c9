"""The batcher: plans each step (continuous batching, chunked prefill, preemption).

Owner: the engine's step loop. `schedule()` decides which sequences run this step and how
many of their uncomputed tokens each one contributes, within a token budget; it allocates the
blocks those tokens need and preempts (by recompute) when the pool runs out. `update()`
applies a step's results: advances counters, registers newly full blocks in the prefix cache,
appends sampled tokens and finishes sequences.

Queues: `waiting` and `ready` are kept in admission order, (priority, arrival): a lower
`Request.priority` first, then the earlier arrival (stamped by `add` or `reserve`). With every
priority equal this is first come, first served.

Policy, as in vLLM v1:
1. Running sequences first, oldest first, each taking up to its remaining tokens (capped by
   the budget and `max_prefill_chunk_tokens`). If blocks run out, the newest running sequence
   is preempted: its blocks are freed and it goes back to the waiting queue, at its
   (priority, arrival) place. Priority never preempts a running sequence by itself.
2. Then, on a decode worker, `ready` sequences (their prompt's KV was pulled into their own
   blocks: `commit`), in admission order, while `max_num_seqs` and blocks allow: they already
   hold their blocks, so they go before the waiting queue. If the first one cannot get the
   block its next token needs and nothing runs, the last ready sequence is preempted by
   recompute, so held prompt blocks can never stall the worker.
3. Then waiting sequences, in admission order, while budget, `max_num_seqs` and blocks allow.
   Admission looks up the longest cached prefix (at most all but one token, so the last
   token is always computed and its logits sampled). When a sequence is queued (`add`), the
   cached prefix it would hit now is marked most recently used (`BlockPool.refresh`; no
   reference is taken): under LRU alone, a prompt queued behind many others finds its prefix
   evicted by their blocks by the time it is admitted, although the router sent it here for
   that prefix (`tandem bench routing_zipf`, load 4.4: two thirds of the cache-aware
   router's misses). vLLM and SGLang refresh a prefix only when it is used.

Speculative decoding (with a `Speculator`, spec/speculator.py): a running sequence's chunk
that catches up with all its tokens also carries drafts, planned by `DraftPlanner`
(draft_planning.py, which states the rule).

Overload (`shed_candidates`): the queued sequences that may be shed for a more important
arrival are those that have not run here and are not filling a reservation (waiting ones never
preempted, and ready ones), least important first: largest priority, then latest arrival.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Mapping
from collections.abc import Sequence as Seq

from tandem.common.block_hash import num_blocks_for
from tandem.common.request import FinishReason, TokenLogprob
from tandem.engine.block_pool import BlockPool
from tandem.engine.draft_planning import DraftPlanner
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.engine.spec.speculator import Speculator
from tandem.engine.step_plan import BatcherConfig, ScheduledChunk, StepPlan
from tandem.engine.stopping import append_verified, stop_reason


class Batcher:
    def __init__(self, config: BatcherConfig, pool: BlockPool, speculator: Speculator | None = None) -> None:
        self.config = config
        self.pool = pool
        self.speculator = speculator
        self._drafts = DraftPlanner(config, pool, speculator)
        # Both queues are sorted by `_admission_key`.
        self.waiting: list[Sequence] = []
        self.ready: list[Sequence] = []  # decode role: prompt KV pulled, waiting for a slot
        self.running: list[Sequence] = []
        self._arrivals = itertools.count()
        self._scheduled_at = 0.0  # when the last plan was made (the target pass starts)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (stamps its arrival) and mark the cached prefix it will hit
        most recently used (module doc, 3.)."""
        seq.arrival = next(self._arrivals)
        _enqueue(self.waiting, seq)
        self.pool.refresh(self._prefix_hit(seq)[::-1])

    def shed_candidates(self) -> list[Sequence]:
        """Queued sequences that overload may shed, the one to shed first first (module doc)."""
        never_run = [s for s in self.waiting if s.num_preemptions == 0]
        return sorted(never_run + self.ready, key=_admission_key, reverse=True)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.ready or self.running)

    @property
    def num_waiting(self) -> int:
        """Sequences queued for a batch slot: to prefill, or with their pulled KV (`ready`)."""
        return len(self.waiting) + len(self.ready)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        drafting: list[tuple[int, int]] = []  # (index in chunks, k)
        step_skipped = self._drafts.step_skipped(self.running, self.ready, self.waiting)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk_len(seq, budget)
            k = self._drafts.num_drafts(seq, n, budget, step_skipped)
            if k and n + k > budget:  # a seeded sampled request: stop short, sample with drafts next step
                n, k = n - 1, 0
            if n == 0:
                i += 1
                continue
            need = num_blocks_for(seq.num_computed_tokens + n + k, self.config.block_size) - len(seq.block_table)
            while need > self.pool.num_free_blocks and self.running[-1] is not seq:
                preempted.append(self._preempt(self.running.pop()))
            if need > self.pool.num_free_blocks:
                # seq itself is the newest running sequence: give its blocks back and wait
                preempted.append(self._preempt(self.running.pop()))
                break
            seq.block_table.extend(self.pool.allocate(need))
            if k:
                drafting.append((len(chunks), k))
            chunks.append(ScheduledChunk(seq, n))
            budget -= n + k
            i += 1
        budget += self._drafts.propose(chunks, drafting)
        self._scheduled_at = time.perf_counter()
        if preempted:
            return StepPlan(tuple(chunks), tuple(preempted), 0)
        budget = self._admit_ready(budget, chunks, preempted)
        num_hit_tokens = self._admit_waiting(budget, chunks)
        return StepPlan(tuple(chunks), tuple(preempted), num_hit_tokens)

    def _admit_ready(self, budget: int, chunks: list[ScheduledChunk], preempted: list[Sequence]) -> int:
        """Move ready sequences into the batch (see the module doc); returns the budget left."""
        while self.ready and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.ready[0]
            n = self._drafts.admission_len(seq, self._chunk_len(seq, budget))
            need = num_blocks_for(seq.num_computed_tokens + n, self.config.block_size) - len(seq.block_table)
            if need > self.pool.num_free_blocks:
                if self.running or chunks:
                    break  # running sequences will finish and free blocks
                last = self.ready.pop()
                preempted.append(self._preempt(last))
                continue
            self.ready.pop(0)
            seq.block_table.extend(self.pool.allocate(need))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if n:
                chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return budget

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        """Admit waiting sequences in order; returns the prefix-cache tokens they reused."""
        bs = self.config.block_size
        total_hit_tokens = 0
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit = self._prefix_hit(seq)
            num_hit_tokens = len(hit) * bs
            n = min(seq.num_tokens - num_hit_tokens, budget, self.config.max_prefill_chunk_tokens or budget)
            n = self._drafts.admission_len(seq, n, seq.num_tokens - num_hit_tokens)
            need = num_blocks_for(num_hit_tokens + n, bs) - len(hit)
            reclaimed = sum(1 for b in hit if self.pool.ref_count(b) == 0)
            if need + reclaimed > self.pool.num_free_blocks:
                break
            self.waiting.pop(0)
            self.pool.touch(hit)
            seq.block_table = hit + self.pool.allocate(need)
            seq.num_computed_tokens = num_hit_tokens
            seq.num_cached_tokens = num_hit_tokens
            seq.num_cached_blocks = len(hit)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if n:
                chunks.append(ScheduledChunk(seq, n))
            budget -= n
            total_hit_tokens += num_hit_tokens
        return total_hit_tokens

    def _prefix_hit(self, seq: Sequence) -> list[int]:
        """Cached blocks covering at most all but the last token. Requests that want prompt
        logits compute every position, so they skip the cache (as vLLM does)."""
        if seq.sampling.needs_prompt_logits:
            return []
        hashes = seq.block_hashes(self.config.block_size)
        return self.pool.lookup_prefix(hashes[: (seq.num_tokens - 1) // self.config.block_size])

    def _chunk_len(self, seq: Sequence, budget: int) -> int:
        cap = self.config.max_prefill_chunk_tokens or budget
        return min(seq.num_new_tokens, budget, cap)

    def _preempt(self, seq: Sequence) -> Sequence:
        self._release(seq)
        if self.speculator is not None:
            self.speculator.rollback(seq.request_id, 0)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.prompt_logits.clear()
        _enqueue(self.waiting, seq)
        return seq

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table[::-1])
        seq.block_table = []
        seq.num_cached_blocks = 0

    def update(
        self,
        plan: StepPlan,
        sampled: dict[str, tuple[int, TokenLogprob | None]],
        eos_token_ids: frozenset[int],
        verified: Mapping[str, Seq[tuple[int, TokenLogprob | None]]] | None = None,
    ) -> list[Sequence]:
        """Apply a step's results. `sampled` maps request id to (token, logprob) for every
        chunk that `samples` without a draft; `verified`, for every chunk with a draft, to the
        accepted drafts and the correction or bonus token, in order. Returns the sequences
        that finished this step."""
        if self.speculator is not None and plan.chunks:  # the step's target pass, for spec/adaptive.py
            self.speculator.costs.observe_pass(plan.num_tokens, time.perf_counter() - self._scheduled_at)
        bs = self.config.block_size
        finished: list[Sequence] = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if chunk.draft is not None:
                assert verified is not None
                reason = append_verified(seq, verified[seq.request_id], eos_token_ids)
            else:
                seq.num_computed_tokens += chunk.num_tokens
            full = seq.num_computed_tokens // bs
            if full > seq.num_cached_blocks:
                hashes = seq.block_hashes(bs)
                for idx in range(seq.num_cached_blocks, full):
                    self.pool.cache_block(seq.block_table[idx], hashes[idx])
                seq.num_cached_blocks = full
            if chunk.draft is not None:
                self._drafts.trim(seq, seq.num_computed_tokens)
                assert self.speculator is not None
                self.speculator.rollback(seq.request_id, seq.num_computed_tokens)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                continue
            if seq.request_id not in sampled:
                continue
            if seq.sampling.max_tokens == 0:  # prompt only (echo): the sampled token is dropped
                self.finish(seq, FinishReason.LENGTH)
                finished.append(seq)
                continue
            token, logprob = sampled[seq.request_id]
            seq.token_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            reason = stop_reason(seq, token, eos_token_ids)
            if reason is None and seq.hand_off:
                reason = FinishReason.HANDOFF
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish `seq` (running, waiting or reserved) and free its blocks, except on a
        HANDOFF, where the caller takes over `seq.block_table` and frees it later."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq in self.ready:  # RESERVED and committed
            self.ready.remove(seq)
        if reason is not FinishReason.HANDOFF:
            self._release(seq)
        if self.speculator is not None:
            self.speculator.finish(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # ---- decode role: blocks reserved for KV pulled from a prefill worker -------------------
    def reserve(self, seq: Sequence) -> bool:
        """Give `seq` (status RESERVED, not queued) blocks for its whole hand-off
        (`num_handoff_tokens`: the prompt and any generated tokens but the first token): the
        longest locally cached prefix plus fresh blocks that a KV pull will fill. False if the
        pool cannot hold it now (the caller then queues the request for local prefill)."""
        bs = self.config.block_size
        num_handoff_blocks = num_blocks_for(seq.num_handoff_tokens, bs)
        hashes = seq.block_hashes(bs)[: seq.num_handoff_tokens // bs]
        seq.arrival = next(self._arrivals)
        hit = self.pool.lookup_prefix(hashes) if not seq.sampling.needs_prompt_logits else []
        need = num_handoff_blocks - len(hit)
        reclaimed = sum(1 for b in hit if self.pool.ref_count(b) == 0)
        if need + reclaimed > self.pool.num_free_blocks:
            return False
        self.pool.touch(hit)
        seq.block_table = hit + self.pool.allocate(need)
        seq.num_cached_tokens = len(hit) * bs
        seq.num_cached_blocks = len(hit)
        seq.status = SequenceStatus.RESERVED
        return True

    def commit(self, seq: Sequence) -> None:
        """The reserved full blocks now hold the prompt's KV: register them in the prefix
        cache under the hashes this worker computed from its own tokens, and queue `seq` as
        `ready` (still RESERVED, holding its blocks) with those blocks computed; `schedule`
        moves it into the batch when `max_num_seqs` allows.

        Only full blocks count as computed: their hashes were compared with the source's
        (decode/handle_check.py), but a partial last block has no hash to compare, so its
        tokens (fewer than `block_size`) are recomputed here with the first token, and KV
        from outside never enters the cache unverified."""
        bs = self.config.block_size
        full = seq.num_handoff_tokens // bs
        seq.num_computed_tokens = full * bs
        hashes = seq.block_hashes(bs)
        for idx in range(seq.num_cached_blocks, full):
            self.pool.cache_block(seq.block_table[idx], hashes[idx])
        seq.num_cached_blocks = full
        _enqueue(self.ready, seq)

    def unreserve(self, seq: Sequence) -> None:
        """Give the reserved blocks back and queue `seq` to prefill locally (recompute)."""
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        _enqueue(self.waiting, seq)


def _admission_key(seq: Sequence) -> tuple[int, int]:
    return (seq.priority, seq.arrival)


def _enqueue(queue: list[Sequence], seq: Sequence) -> None:
    """Insert `seq` at its admission-order place (after equal keys)."""
    bisect.insort(queue, seq, key=_admission_key)
