"""The fast step model: the engine batcher's step planning on counters, with no tokens or tensors.

It plans each step exactly as `tandem.engine.batcher.Batcher.schedule` does (a test replays a
recorded step sequence through both and compares the per-step token counts):
1. Running sequences first, oldest first, each taking min(its uncomputed tokens, the budget left,
   `max_prefill_chunk_tokens`). When blocks run out, the newest running sequence is preempted
   by recompute (it frees its blocks and goes back to the waiting queue at its arrival place);
   if the sequence itself is the newest, it is preempted and the pass stops. A step that
   preempted admits nothing.
2. Then `ready` sequences (a decode worker's pulled hand-offs, holding their blocks) in arrival
   order, while the budget and `max_num_seqs` allow.
3. Then waiting sequences in arrival order, while budget, `max_num_seqs` and blocks allow; an
   admission reuses the worker's cached prefix of its group (at most all but the last token).

Departures from the real batcher (no speculative decoding, no priorities): the prefix cache
holds shared group prefixes only, and those blocks are not charged to the pool (a hit takes no
block, as a hit on an unreferenced cached block in the real pool takes none from the free count
until it is touched); nothing is evicted from it. A preempted sequence recomputes all its
tokens (the real pool may still hold its full blocks and hit them): the agreement test runs
the real batcher with prefix caching off for that reason.

`decode_run` is what makes 1,000 GPUs tractable: while a batch only decodes (every chunk is
one token of a running sequence and nothing can be admitted), the next steps are the same
batch one token longer each, so the caller advances many of them in one event.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tandem.common.block_hash import num_blocks_for
from tandem.sim.sequence import Chunk, Plan, SimSeq

PLANNERS = ("batcher", "vllm-0.1.7")


@dataclass(frozen=True)
class StepModelConfig:
    """The batcher's limits (`BatcherConfig`) and the worker's KV pool size in blocks."""

    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_prefill_chunk_tokens: int | None = None
    num_blocks: int = 65536
    # "batcher": the engine's batcher (this module); "vllm-0.1.7": `legacy_vllm.py`, the
    # colocated baseline of the DistServe reproduction only
    planner: str = "batcher"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"step model {name} must be an int >= 1, got {value!r}")
        if self.max_prefill_chunk_tokens is not None and self.max_prefill_chunk_tokens < 1:
            raise ValueError(f"max_prefill_chunk_tokens must be >= 1 or None, got {self.max_prefill_chunk_tokens!r}")
        if self.planner not in PLANNERS:
            raise ValueError(f"step model planner must be one of {', '.join(PLANNERS)}, got {self.planner!r}")


class StepModel:
    """One worker's queues and KV pool. Owner: that worker in the event loop."""

    run_spare_blocks = 0  # blocks a decode run leaves free (a planner that needs slack sets it)

    def __init__(self, config: StepModelConfig) -> None:
        self.config = config
        self.waiting: list[SimSeq] = []
        self.ready: list[SimSeq] = []
        self.running: list[SimSeq] = []
        self.num_free_blocks = config.num_blocks
        self.cached_prefix_blocks: dict[int, int] = {}  # group -> leading blocks cached here
        self.num_preemptions = 0
        self._arrivals = 0

    # ---- queues -----------------------------------------------------------------------------
    def add(self, seq: SimSeq) -> None:
        """Queue a new sequence to prefill here."""
        seq.arrival = self._next_arrival()
        bisect.insort(self.waiting, seq, key=_arrival)

    def reserve(self, seq: SimSeq) -> bool:
        """A decode worker takes a pulled hand-off (`Batcher.reserve` + `commit`): blocks for the
        prompt (its cached prefix shared), the full blocks computed, queued as ready. False if the
        pool cannot hold it (the caller then adds it to prefill here)."""
        bs = self.config.block_size
        num_handoff = seq.num_tokens - 1
        hit = min(self.cached_prefix_blocks.get(seq.group, 0), num_handoff // bs) if seq.group is not None else 0
        need = num_blocks_for(num_handoff, bs) - hit
        if need > self.num_free_blocks:
            return False
        seq.arrival = self._next_arrival()
        self.num_free_blocks -= need
        seq.num_blocks, seq.num_hit_blocks = need, hit
        seq.num_computed = (num_handoff // bs) * bs
        self.ready.append(seq)  # arrivals only grow: appending keeps arrival order
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.ready or self.running)

    @property
    def num_used_blocks(self) -> int:
        return self.config.num_blocks - self.num_free_blocks

    def queued_prefill_tokens(self) -> int:
        """What the worker publishes (`worker/load.py`): uncomputed tokens of the waiting
        sequences plus those of the running ones beyond the next token."""
        queued = sum(s.num_new for s in self.waiting)
        return queued + sum(s.num_new - 1 for s in self.running if s.num_new > 1)

    # ---- planning -----------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Plan the next step; allocates blocks and preempts (module docstring)."""
        cfg = self.config
        bs, cap = cfg.block_size, cfg.max_prefill_chunk_tokens
        budget = cfg.max_num_batched_tokens
        chunks: list[Chunk] = []
        preempted: list[SimSeq] = []
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_new, budget, cap or budget)
            if n == 0:
                i += 1
                continue
            need = num_blocks_for(seq.num_computed + n, bs) - seq.num_hit_blocks - seq.num_blocks
            while need > self.num_free_blocks and running[-1] is not seq:
                preempted.append(self._preempt(running.pop()))
            if need > self.num_free_blocks:
                preempted.append(self._preempt(running.pop()))
                break
            if need > 0:
                seq.num_blocks += need
                self.num_free_blocks -= need
            chunks.append(Chunk(seq, n))
            budget -= n
            i += 1
        if preempted:
            return Plan(tuple(chunks), tuple(preempted), 0)
        admitted = len(running)
        budget = self._admit_ready(budget, chunks)
        self._admit_waiting(budget, chunks)
        return Plan(tuple(chunks), (), len(running) - admitted)

    def _admit_ready(self, budget: int, chunks: list[Chunk]) -> int:
        cfg = self.config
        while self.ready and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.ready[0]
            n = min(seq.num_new, budget, cfg.max_prefill_chunk_tokens or budget)
            need = num_blocks_for(seq.num_computed + n, cfg.block_size) - seq.num_hit_blocks - seq.num_blocks
            if need > self.num_free_blocks:
                if self.running or chunks:
                    break
                self._preempt(self.ready.pop())
                continue
            self.ready.pop(0)
            seq.num_blocks += max(0, need)
            self.num_free_blocks -= max(0, need)
            self.running.append(seq)
            if n:
                chunks.append(Chunk(seq, n))
            budget -= n
        return budget

    def _admit_waiting(self, budget: int, chunks: list[Chunk]) -> None:
        cfg = self.config
        bs = cfg.block_size
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            hit = 0
            if seq.group is not None:
                hit = min(self.cached_prefix_blocks.get(seq.group, 0), (seq.num_tokens - 1) // bs)
            n = min(seq.num_tokens - hit * bs, budget, cfg.max_prefill_chunk_tokens or budget)
            need = num_blocks_for(hit * bs + n, bs) - hit
            if need > self.num_free_blocks:
                break
            self.waiting.pop(0)
            self.num_free_blocks -= need
            seq.num_blocks, seq.num_hit_blocks = need, hit
            seq.num_computed = hit * bs
            self.running.append(seq)
            if n:
                chunks.append(Chunk(seq, n))
            budget -= n

    # ---- results ------------------------------------------------------------------------------
    def update(self, plan: Plan) -> tuple[list[SimSeq], list[SimSeq], list[tuple[int, int, int]]]:
        """Apply a step: advance counters, sample a token for every chunk that catches up.

        Returns (sequences that sampled a token, sequences that finished, newly cached prefix
        blocks as (group, leading blocks cached before, leading blocks cached now)). A finished hand-off keeps its
        blocks (the caller frees them with `release` after the pull)."""
        bs = self.config.block_size
        sampled: list[SimSeq] = []
        finished: list[SimSeq] = []
        stored: list[tuple[int, int, int]] = []
        for chunk in plan.chunks:
            seq = chunk.seq
            samples = chunk.samples
            seq.num_computed += chunk.num_tokens
            if seq.group is not None and seq.prefix_tokens >= bs:
                full = min(seq.num_computed, seq.prefix_tokens) // bs
                before = self.cached_prefix_blocks.get(seq.group, 0)
                if full > before:
                    self.cached_prefix_blocks[seq.group] = full
                    stored.append((seq.group, before, full))
            if not samples:
                continue
            seq.num_tokens += 1
            sampled.append(seq)
            if seq.hand_off or seq.num_tokens >= seq.max_tokens:
                self.running.remove(seq)
                if not seq.hand_off:
                    self.release(seq)
                finished.append(seq)
        return sampled, finished, stored

    def release(self, seq: SimSeq) -> None:
        """Give back the blocks `seq` holds (finished, or a hand-off after its pull)."""
        self.num_free_blocks += seq.num_blocks
        seq.num_blocks = seq.num_hit_blocks = 0

    # ---- skipping ahead -----------------------------------------------------------------------
    def decode_run(self, plan: Plan) -> int:
        """How many steps, this planned one included, the batch stays a pure decode batch: every
        chunk is one token of a running sequence, nothing was admitted or preempted, and the
        next steps admit nothing (the budget and `max_num_seqs` stay as they are, and blocks only
        get scarcer). Ends at the first step that finishes a sequence, or the last one whose new
        blocks still fit. 1 when the plan is not a pure decode step."""
        if plan.preempted or plan.admitted or len(plan.chunks) != len(self.running):
            return 1
        # A queued sequence that was not admitted this step stays out until one finishes: the
        # budget and the batch size do not change, and the free blocks only shrink.
        for c in plan.chunks:
            if c.num_tokens != 1 or c.seq.num_new != 1 or c.seq.hand_off:
                return 1
        steps = min(s.max_tokens - s.num_tokens for s in self.running)  # the step that finishes one
        if steps <= 1:
            return 1
        # The planned step already holds its blocks; step j (1-based) computes position
        # num_computed + j - 1 and needs blocks up to num_computed + j tokens.
        bs = self.config.block_size

        def need(k: int) -> int:
            return sum(num_blocks_for(s.num_computed + k, bs) - s.num_hit_blocks - s.num_blocks for s in self.running)

        free = self.num_free_blocks - self.run_spare_blocks
        if need(steps) <= free:  # the common case: the whole run fits
            return steps
        low, high = 1, steps - 1
        while low < high:
            mid = (low + high + 1) // 2
            if need(mid) <= free:
                low = mid
            else:
                high = mid - 1
        return low

    def advance_decode(self, plan: Plan, steps: int) -> list[SimSeq]:
        """Apply the `steps` - 1 decode steps of the run `plan` started that follow it (the
        first is applied by `update`), allocating their blocks; returns the sequences the last
        step finished. Call after `update(plan)`, with `steps` from `decode_run(plan)` or fewer."""
        extra = steps - 1
        if extra <= 0:
            return []
        bs = self.config.block_size
        finished = []
        for s in self.running:
            # after update: num_computed = c, num_tokens = c + 1; `extra` more tokens each
            target = num_blocks_for(s.num_computed + extra, bs) - s.num_hit_blocks
            if target > s.num_blocks:
                self.num_free_blocks -= target - s.num_blocks
                s.num_blocks = target
            s.num_computed += extra
            s.num_tokens += extra
            if s.num_tokens >= s.max_tokens:
                finished.append(s)
        for s in finished:
            self.running.remove(s)
            self.release(s)
        return finished

    def _preempt(self, seq: SimSeq) -> SimSeq:
        self.release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_arrival)
        return seq

    def _next_arrival(self) -> int:
        self._arrivals += 1
        return self._arrivals


def _arrival(seq: SimSeq) -> int:
    return seq.arrival
