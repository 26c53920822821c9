"""vLLM 0.1.7's step planning (the DistServe baseline), checked on a hand-worked sequence of steps."""

from __future__ import annotations

import pytest

from tandem.sim.legacy_vllm import LEGACY_VLLM, LegacyVllmStepModel
from tandem.sim.sequence import SimSeq
from tandem.sim.stepmodel import StepModel, StepModelConfig
from tandem.sim.types import StepShape
from tandem.sim.worker import SimWorker

Step = tuple[list[tuple[int, int]], list[int]]


def config(**kw: int) -> StepModelConfig:
    return StepModelConfig(planner=LEGACY_VLLM, **kw)  # type: ignore[arg-type]


def step(model: StepModel) -> Step:
    plan = model.schedule()
    model.update(plan)
    return [(c.seq.rid, c.num_tokens) for c in plan.chunks], [s.rid for s in plan.preempted]


def waiting(model: StepModel) -> list[tuple[int, int, int]]:
    return [(s.rid, s.num_tokens, s.num_computed) for s in model.waiting]


def test_hand_worked_sequence() -> None:
    """Block size 4, 6 blocks (watermark 0), 16 tokens a step, 3 sequences.
    A: prompt 7, 6 out; B: prompt 4, 6 out; C: prompt 6, 3 out; all waiting at the start."""
    model = LegacyVllmStepModel(config(block_size=4, max_num_batched_tokens=16, max_num_seqs=3, num_blocks=6))
    for rid, prompt, out in ((0, 7, 6), (1, 4, 6), (2, 6, 3)):
        model.add(SimSeq(rid, prompt, prompt + out, False, None, 0))
    # 1: A and B prefill (7 + 4 tokens, 3 blocks); C would make 17 > 16 tokens
    plan = model.schedule()
    assert plan.shape() == StepShape(11, 28 + 10, 0, 0)
    model.update(plan)
    assert model.num_free_blocks == 3
    # 2: C prefills alone; A and B, running, do not decode in a prompt step
    assert step(model) == ([(2, 6)], [])
    assert model.num_free_blocks == 1
    # 3: decode oldest first: A needs no block, B takes the last one; C finds none free and,
    # the newest, preempts itself (recompute: back to waiting with prompt + 1 generated token)
    assert step(model) == ([(0, 1), (1, 1)], [2])
    assert (model.num_free_blocks, waiting(model)) == (2, [(2, 7, 0)])
    # 4: C recomputes its 7 tokens (2 blocks: the watermark is 0, so 0 free after is allowed)
    assert step(model) == ([(2, 7)], [])
    assert model.num_free_blocks == 0
    # 5: A needs a third block, none free: the newest running (C) is preempted for it
    assert step(model) == ([(0, 1), (1, 1)], [2])
    assert (model.num_free_blocks, waiting(model)) == (1, [(2, 8, 0)])
    # 6: C needs 2 blocks, 1 free: a decode step; a run of 2 (the 3rd step would leave B's
    # new block taking the last free one, which `run_spare_blocks` keeps out of a run)
    plan = model.schedule()
    assert [(c.seq.rid, c.num_tokens) for c in plan.chunks] == [(0, 1), (1, 1)]
    assert plan.shape() == StepShape(0, 0, 2, 10 + 7)
    assert model.decode_run(plan) == 2
    model.update(plan)
    # 7, 8: planned one by one they equal the run and its continuation; both finish at 8
    assert step(model) == ([(0, 1), (1, 1)], [])
    assert step(model) == ([(0, 1), (1, 1)], [])
    assert (model.num_free_blocks, [s.rid for s in model.running]) == (6, [])
    # 9: C's third prefill samples its last token
    assert step(model) == ([(2, 8)], [])
    assert not model.has_work and model.num_free_blocks == 6 and model.num_preemptions == 2


def test_admission_limits_batch_size_and_watermark() -> None:
    # 100 blocks: the watermark is int(0.01 x 100) = 1 block left free after an admission
    model = LegacyVllmStepModel(config(block_size=4, max_num_batched_tokens=1000, max_num_seqs=2, num_blocks=100))
    model.add(SimSeq(0, 400, 401, False, None, 0))  # 100 blocks: 0 left < 1
    assert model.schedule().chunks == ()
    model = LegacyVllmStepModel(config(block_size=4, max_num_batched_tokens=1000, max_num_seqs=2, num_blocks=100))
    for rid, prompt in enumerate((396, 4, 4)):  # 99 blocks leaves exactly the watermark
        model.add(SimSeq(rid, prompt, prompt + 2, False, None, 0))
    assert step(model) == ([(0, 396)], [])
    model = LegacyVllmStepModel(config(block_size=4, max_num_batched_tokens=1000, max_num_seqs=2, num_blocks=100))
    for rid in range(3):
        model.add(SimSeq(rid, 4, 6, False, None, 0))
    assert step(model) == ([(0, 4), (1, 4)], [])  # max_num_seqs 2
    assert step(model) == ([(0, 1), (1, 1)], [])  # the third waits for a slot; both finish
    assert step(model) == ([(2, 4)], [])


def test_takes_no_hand_offs_and_is_chosen_by_the_config() -> None:
    model = LegacyVllmStepModel(config(num_blocks=100))
    seq = SimSeq(0, 8, 20, False, None, 0)
    seq.num_tokens = 9
    assert model.reserve(seq) is False
    worker = SimWorker(None, config(num_blocks=100), None, 0.0)  # type: ignore[arg-type]
    assert type(worker.model) is LegacyVllmStepModel
    worker = SimWorker(None, StepModelConfig(num_blocks=100), None, 0.0)  # type: ignore[arg-type]
    assert type(worker.model) is StepModel
    with pytest.raises(ValueError, match=r"^step model planner must be one of batcher, vllm-0.1.7, got 'vllm'$"):
        StepModelConfig(planner="vllm")
