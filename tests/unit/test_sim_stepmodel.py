"""The simulator's step model plans the same steps as the engine's real batcher.

A recorded step sequence (which requests arrive before which step) is replayed through both;
each step's chunks (request, tokens) and preemptions must be equal. Prompts have distinct
tokens, so the real prefix cache never hits (the step model's cache only holds group prefixes).
"""

from __future__ import annotations

import random

from tandem.common.block_hash import block_extra
from tandem.common.request import Request, SamplingParams
from tandem.engine.batcher import Batcher
from tandem.engine.block_pool import BlockPool
from tandem.engine.sequence import Sequence
from tandem.engine.step_plan import BatcherConfig
from tandem.sim.sequence import SimSeq
from tandem.sim.stepmodel import StepModel, StepModelConfig
from tandem.sim.types import StepShape

EOS = frozenset({0})
Step = list[tuple[str, int]]


class Pair:
    """The real batcher and the step model, fed the same arrivals."""

    def __init__(self, block_size: int, budget: int, max_seqs: int, chunk: int | None, num_blocks: int) -> None:
        self.real = Batcher(
            BatcherConfig(block_size, budget, max_seqs, chunk), BlockPool(num_blocks, enable_prefix_caching=False)
        )
        self.model = StepModel(StepModelConfig(block_size, budget, max_seqs, chunk, num_blocks))
        self._next_token = 1
        self.sims: dict[int, SimSeq] = {}

    def _tokens(self, n: int) -> tuple[int, ...]:
        start = self._next_token
        self._next_token += n
        return tuple(range(start, start + n))

    def add(self, rid: int, prompt: int, output: int) -> None:
        request = Request(str(rid), self._tokens(prompt), SamplingParams(max_tokens=output, temperature=0.0))
        self.real.add(Sequence(request=request, hash_extra=block_extra("m"), max_total_tokens=100_000))
        self.sims[rid] = sim = SimSeq(rid, prompt, prompt + output, False, None, 0)
        self.model.add(sim)

    def handoff(self, rid: int, prompt: int, output: int) -> None:
        """A decode worker takes a pulled prompt (reserve, then commit once the pull is done)."""
        tokens = self._tokens(prompt + 1)
        request = Request(str(rid), tokens[:prompt], SamplingParams(max_tokens=output, temperature=0.0))
        seq = Sequence(request=request, hash_extra=block_extra("m"), max_total_tokens=100_000)
        seq.token_ids = list(tokens)
        assert self.real.reserve(seq)
        self.real.commit(seq)
        sim = SimSeq(rid, prompt, prompt + output, False, None, 0)
        sim.num_tokens = prompt + 1
        assert self.model.reserve(sim)
        self.sims[rid] = sim

    def step(self) -> tuple[Step, Step, list[str], list[str]]:
        plan = self.real.schedule()
        real = [(c.seq.request_id, c.num_tokens) for c in plan.chunks]
        real_preempted = [s.request_id for s in plan.preempted]
        self.real.update(plan, {c.seq.request_id: (9, None) for c in plan.chunks if c.samples}, EOS)
        sim_plan = self.model.schedule()
        sim = [(str(c.seq.rid), c.num_tokens) for c in sim_plan.chunks]
        sim_preempted = [str(s.rid) for s in sim_plan.preempted]
        self.model.update(sim_plan)
        return real, sim, real_preempted, sim_preempted


def test_recorded_sequence_same_tokens_per_step() -> None:
    """200 steps of a seeded arrival record: chunked prefill, a tight pool (preemption and
    recompute), the batch size cap and decode hand-offs."""
    rng = random.Random(7)
    pair = Pair(block_size=4, budget=48, max_seqs=6, chunk=20, num_blocks=40)
    arrivals = {}
    for rid in range(40):
        step = rng.randrange(150)
        arrivals.setdefault(step, []).append((rid, rng.randint(1, 60), rng.randint(1, 30), rng.random() < 0.3))
    num_preempted = 0
    for step in range(200):
        for rid, prompt, output, handoff in arrivals.get(step, []):
            if handoff and pair.model.num_free_blocks > prompt // 4 + 1:
                pair.handoff(rid, prompt, output)
            else:
                pair.add(rid, prompt, output)
        real, sim, real_preempted, sim_preempted = pair.step()
        assert sim == real, f"step {step}"
        assert sim_preempted == real_preempted, f"step {step}"
        num_preempted += len(real_preempted)
        assert pair.model.num_free_blocks == pair.real.pool.num_free_blocks, f"step {step}"
    assert not pair.real.has_work and not pair.model.has_work
    assert pair.model.num_free_blocks == 40
    assert num_preempted == pair.model.num_preemptions
    assert num_preempted > 0  # the record exercises preemption and recompute


def test_decode_run_equals_single_steps() -> None:
    """A decode run of k steps, advanced in one event, leaves the state k real steps leave."""
    pair = Pair(block_size=4, budget=64, max_seqs=8, chunk=None, num_blocks=64)
    pair.add(0, 5, 12)
    pair.add(1, 9, 20)
    real, sim, _, _ = pair.step()
    assert real == sim == [("0", 5), ("1", 9)]
    plan = pair.model.schedule()
    steps = pair.model.decode_run(plan)
    assert steps == 11  # request 0 has 17 - 6 = 11 tokens to go: the 11th step finishes it
    pair.model.update(plan)
    finished = pair.model.advance_decode(plan, steps)
    assert [s.rid for s in finished] == [0]
    for _ in range(steps):
        real_plan = pair.real.schedule()
        assert [(c.seq.request_id, c.num_tokens) for c in real_plan.chunks] == [("0", 1), ("1", 1)]
        pair.real.update(real_plan, {c.seq.request_id: (9, None) for c in real_plan.chunks}, EOS)
    assert [s.request_id for s in pair.real.running] == ["1"]
    assert [s.rid for s in pair.model.running] == [1]
    real_seq, sim_seq = pair.real.running[0], pair.sims[1]
    assert (sim_seq.num_tokens, sim_seq.num_computed) == (real_seq.num_tokens, real_seq.num_computed_tokens) == (21, 20)
    assert pair.model.num_free_blocks == pair.real.pool.num_free_blocks == 64 - 5  # 20 computed tokens


def test_decode_run_stops_where_blocks_run_out() -> None:
    """Two sequences, 4 free blocks left: the run ends at the last step whose blocks fit."""
    model = StepModel(StepModelConfig(block_size=4, max_num_batched_tokens=64, max_num_seqs=8, num_blocks=8))
    for rid in (0, 1):
        model.add(SimSeq(rid, 8, 100, False, None, 0))
    model.update(model.schedule())  # prefill: 2 blocks each, then 1 token sampled each
    plan = model.schedule()  # positions 8: one more block each; 2 free left
    assert model.num_free_blocks == 2
    # step j needs blocks for 8 + j tokens: j <= 4 fits in the held 3 blocks; j = 5..8 needs
    # one more each (2 free): the run is 8 steps; j = 9 would need a fifth block each
    assert model.decode_run(plan) == 8


def test_step_shape() -> None:
    model = StepModel(StepModelConfig(block_size=4, max_num_batched_tokens=10, num_blocks=32))
    model.add(SimSeq(0, 6, 10, False, None, 0))
    model.add(SimSeq(1, 8, 10, False, None, 0))
    plan = model.schedule()
    # chunk 0: 6 tokens from 0 (context 1+..+6 = 21); chunk 1: 4 tokens from 0 (1+2+3+4 = 10)
    assert plan.shape() == StepShape(prefill_tokens=10, prefill_context_tokens=31)
    model.update(plan)
    plan = model.schedule()
    # seq 0 decodes position 6 (context 7); seq 1 prefills 4 tokens from 4 (5+6+7+8 = 26)
    assert plan.shape() == StepShape(
        prefill_tokens=4, prefill_context_tokens=26, decode_seqs=1, decode_context_tokens=7
    )
