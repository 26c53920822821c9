"""The engine's bounded waiting queue: admission order by (priority, arrival), shedding of the
least important queued request under overload, refusal when nothing can be shed, and the
final ABORT output of every sequence finished outside a step (tiny model, exact tables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.common.block_hash import block_extra
from tandem.common.request import Request
from tandem.engine import Engine, FinishReason, RequestOutput, SamplingParams
from tandem.engine.admission import WaitingQueueFullError
from tandem.engine.batcher import Batcher
from tandem.engine.block_pool import BlockPool
from tandem.engine.sequence import Sequence
from tandem.engine.step_plan import BatcherConfig
from tests.conftest import random_prompts

ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(tiny_model_dir: Path) -> Engine:
    # one sequence per step: admission order is the order of the outputs
    return Engine.from_pretrained(tiny_model_dir, num_blocks=64, max_num_seqs=1, max_model_len=256)


def _run(engine: Engine) -> list[str]:
    """Step until idle; the request ids in the order their first token came out."""
    order: list[str] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id not in order:
                order.append(out.request_id)
    return order


def _shed(request_id: str, shed_priority: int, priority: int) -> RequestOutput:
    message = f"shed: priority {shed_priority} request displaced by priority {priority} under overload"
    return RequestOutput(request_id, (), (), FinishReason.ABORT, None, 0, message)


@pytest.mark.parametrize(
    ("arrivals", "admitted"),
    [
        # (request id, priority) in arrival order -> order of admission into running
        ([("a", 0), ("b", 0), ("c", 0)], ["a", "b", "c"]),
        ([("a", 0), ("b", 5), ("c", 1), ("d", 5), ("e", 0)], ["a", "e", "c", "b", "d"]),
        ([("a", 3), ("b", -2), ("c", 3), ("d", -2)], ["b", "d", "a", "c"]),
    ],
)
def test_admission_order_is_priority_then_arrival(
    engine: Engine, arrivals: list[tuple[str, int]], admitted: list[str]
) -> None:
    (prompt,) = random_prompts([10], engine.model_config.vocab_size, seed=3)
    for request_id, priority in arrivals:
        engine.add_request(request_id, prompt, ONE, priority=priority)
    assert [s.request_id for s in engine.batcher.waiting] == admitted
    assert _run(engine) == admitted
    engine.check_integrity()
    assert engine.is_drained()


def test_running_sequence_is_not_preempted_by_priority(engine: Engine) -> None:
    p1, p2 = random_prompts([10, 12], engine.model_config.vocab_size, seed=4)
    engine.add_request("low", p1, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), priority=9)
    assert [o.request_id for o in engine.step()] == ["low"]
    engine.add_request("high", p2, ONE, priority=-1)
    assert [o.request_id for o in engine.step()] == ["low"]  # max_num_seqs=1: "high" waits
    assert [o.request_id for o in engine.step()] == ["low"]
    assert [o.request_id for o in engine.step()] == ["high"]
    assert engine.is_drained() and engine.take_aborted() == []


def test_full_queue_sheds_least_important_latest_or_refuses(engine: Engine) -> None:
    prompts = random_prompts([10] * 9, engine.model_config.vocab_size, seed=5)
    engine.add_request("run", prompts[0], LONG, max_waiting=3)
    engine.step()  # "run" is running: it neither counts as waiting nor can be shed
    for i, (request_id, priority) in enumerate([("q1", 5), ("q2", 5), ("q3", 2)], start=1):
        engine.add_request(request_id, prompts[i], ONE, priority=priority, max_waiting=3)
    assert engine.num_waiting == 3
    # (arrival, priority) -> shed request (or refused), waiting queue afterwards
    with pytest.raises(WaitingQueueFullError) as err:
        engine.add_request("x", prompts[4], ONE, priority=5, max_waiting=3)
    assert str(err.value) == (
        "waiting queue is full (3 waiting, max_waiting 3) and no queued request is less important than priority 5"
    )
    assert engine.take_aborted() == [] and "x" not in {s.request_id for s in engine.batcher.waiting}
    engine.add_request("y", prompts[5], ONE, priority=1, max_waiting=3)
    assert engine.take_aborted() == [_shed("q2", 5, 1)]  # priority 5, the later of q1 and q2
    assert [s.request_id for s in engine.batcher.waiting] == ["y", "q3", "q1"]
    engine.add_request("z", prompts[6], ONE, priority=2, max_waiting=3)
    assert engine.take_aborted() == [_shed("q1", 5, 2)]
    with pytest.raises(WaitingQueueFullError, match="less important than priority 2$"):
        engine.add_request("u", prompts[7], ONE, priority=2, max_waiting=3)  # q3, z: equal, not less
    engine.add_request("v", prompts[8], ONE, priority=0, max_waiting=3)
    assert engine.take_aborted() == [_shed("z", 2, 0)]  # z arrived after q3
    assert [s.request_id for s in engine.batcher.waiting] == ["v", "y", "q3"]
    assert engine.abort("run") is True
    (out,) = engine.take_aborted()  # an abort's final output: no tokens, ABORT, no shed message
    assert (out.request_id, out.new_token_ids, out.finish_reason, out.shed_message) == (
        "run",
        (),
        FinishReason.ABORT,
        None,
    )
    assert out.first_scheduled_s is not None
    assert _run(engine) == ["v", "y", "q3"]
    assert engine.stats.finished == {"abort": 4, "length": 3}
    engine.check_integrity()
    assert engine.is_drained() and engine.take_aborted() == []


def test_reserved_and_ready_sequences_count_and_ready_ones_can_be_shed(tiny_model_dir: Path) -> None:
    decode = Engine.from_pretrained(tiny_model_dir, num_blocks=64, max_num_seqs=1)
    p1, p2, p3 = random_prompts([20, 20, 20], decode.model_config.vocab_size, seed=6)
    assert decode.reserve("ready", p1, ONE, 7, priority=4, max_waiting=2) is not None
    decode.commit("ready")
    assert decode.reserve("pulling", p2, ONE, 7, priority=9, max_waiting=2) is not None
    assert decode.num_waiting == 2
    # "pulling" is less important but is filling a reservation: only "ready" may be shed
    assert decode.reserve("new", p3, ONE, 7, priority=1, max_waiting=2) is not None
    assert decode.take_aborted() == [_shed("ready", 4, 1)]
    with pytest.raises(WaitingQueueFullError, match=r"^waiting queue is full \(2 waiting, max_waiting 2\)"):
        decode.add_request("local", p1, ONE, priority=0, max_waiting=2)
    for request_id in ("pulling", "new"):
        decode.unreserve(request_id)
    assert _run(decode) == ["new", "pulling"]
    decode.check_integrity()
    assert decode.is_drained()


def test_shed_candidates_exclude_preempted_sequences() -> None:
    def make(request_id: str, prompt_len: int, priority: int) -> Sequence:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        request = Request(request_id, tuple(range(1, prompt_len + 1)), params, None, priority)
        return Sequence(request=request, hash_extra=block_extra("m"), max_total_tokens=100)

    def step(b: Batcher) -> tuple[str, ...]:
        plan = b.schedule()
        b.update(plan, {c.seq.request_id: (9, None) for c in plan.chunks if c.samples}, frozenset())
        return tuple(s.request_id for s in plan.preempted)

    b = Batcher(BatcherConfig(4, 64, 8, None), BlockPool(3))  # 4-token blocks
    b.add(make("old", 5, 0))  # 2 blocks
    b.add(make("new", 3, 7))  # 1 block: the pool is full
    assert step(b) == ()
    b.add(make("late", 3, 3))
    assert [s.request_id for s in b.shed_candidates()] == ["late"]  # running ones are never shed
    assert step(b) == ()  # new's 4th token still fits its block
    assert step(b) == ("new",)  # new's 5th token needs a block: new (the newest) is preempted
    assert [s.request_id for s in b.waiting] == ["late", "new"]  # (priority, arrival) order
    assert [s.request_id for s in b.shed_candidates()] == ["late"]  # "new" has run here: not shed
