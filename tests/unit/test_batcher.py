"""Batcher plans as tables: which sequences run, how many tokens, which blocks, who is preempted."""

from __future__ import annotations

from tandem.common.block_hash import block_extra
from tandem.common.request import FinishReason, Request, SamplingParams
from tandem.engine.batcher import Batcher
from tandem.engine.block_pool import BlockPool
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.engine.step_plan import BatcherConfig

BS = 4
EOS = frozenset({0})


def make(request_id: str, prompt: list[int], max_tokens: int = 8) -> Sequence:
    return Sequence(
        request=Request(request_id, tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0)),
        hash_extra=block_extra("m"),
        max_total_tokens=1000,
    )


def batcher(num_blocks: int, budget: int = 64, chunk: int | None = None, max_seqs: int = 8) -> Batcher:
    return Batcher(BatcherConfig(BS, budget, max_seqs, chunk), BlockPool(num_blocks))


def run_step(b: Batcher, token: int = 9) -> list[tuple[str, int]]:
    plan = b.schedule()
    sampled = {c.seq.request_id: (token, None) for c in plan.chunks if c.samples}
    b.update(plan, sampled, EOS)
    return [(c.seq.request_id, c.num_tokens) for c in plan.chunks]


def test_chunked_prefill_under_budget_and_block_ids() -> None:
    b = batcher(num_blocks=10, budget=6)
    a, c = make("a", list(range(1, 11))), make("c", [5, 6, 7])
    b.add(a)
    b.add(c)
    assert run_step(b) == [("a", 6)]  # budget 6 taken by a's first chunk
    assert a.block_table == [0, 1] and a.num_computed_tokens == 6 and a.num_output_tokens == 0
    assert run_step(b) == [("a", 4), ("c", 2)]
    assert a.block_table == [0, 1, 2] and c.block_table == [3]
    assert a.output_token_ids == [9] and c.num_output_tokens == 0
    assert run_step(b) == [("a", 1), ("c", 1)]
    assert c.output_token_ids == [9] and a.output_token_ids == [9, 9]
    b.pool.check_integrity()


def test_prefill_chunk_cap() -> None:
    b = batcher(num_blocks=10, budget=64, chunk=3)
    s = make("s", list(range(1, 9)))
    b.add(s)
    assert [run_step(b) for _ in range(4)] == [[("s", 3)], [("s", 3)], [("s", 2)], [("s", 1)]]


def test_preempts_newest_and_recomputes() -> None:
    b = batcher(num_blocks=3, budget=64)
    old, new = make("old", [1, 2, 3, 4, 5, 6, 7]), make("new", [8, 9, 10])
    b.add(old)
    b.add(new)
    assert run_step(b) == [("old", 7), ("new", 3)]
    assert old.block_table == [0, 1] and new.block_table == [2]
    # positions 7 (old) and 3 (new) still fit their last blocks
    assert run_step(b) == [("old", 1), ("new", 1)]
    assert old.block_table == [0, 1] and new.block_table == [2]
    # old's position 8 needs a third block: new is preempted and gives block 2 to old
    plan = b.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("old", 1)]
    assert plan.preempted == (new,)
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert new.output_token_ids == [9, 9]  # kept: recomputed from prompt + outputs later
    assert old.block_table == [0, 1, 2]
    assert list(b.waiting) == [new]
    b.update(plan, {"old": (9, None)}, EOS)
    b.pool.check_integrity()


def test_preempts_newer_sequence_to_make_room_for_older() -> None:
    b = batcher(num_blocks=2, budget=64)
    a, c = make("a", [1, 2, 3, 4]), make("c", [5, 6, 7, 8])
    b.add(a)
    b.add(c)
    assert run_step(b) == [("a", 4), ("c", 4)]
    plan = b.schedule()  # both need a second block; c (newest) goes first, then a fits
    assert [(x.seq.request_id, x.num_tokens) for x in plan.chunks] == [("a", 1)]
    assert plan.preempted == (c,)
    assert a.block_table == [0, 1]


def test_admission_reuses_cached_prefix_but_computes_last_token() -> None:
    b = batcher(num_blocks=10)
    first = make("first", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=1)
    b.add(first)
    assert run_step(b) == [("first", 9)]
    assert first.is_finished and first.finish_reason is FinishReason.LENGTH
    assert b.pool.cached_hashes() and b.pool.num_used_blocks == 0
    second = make("second", [1, 2, 3, 4, 5, 6, 7, 8, 20, 21])
    b.add(second)
    assert run_step(b) == [("second", 2)]
    assert second.num_cached_tokens == 8 and second.block_table[:2] == [0, 1]
    exact = make("exact", [1, 2, 3, 4, 5, 6, 7, 8])  # fully cached: last block recomputed
    b.add(exact)
    assert run_step(b) == [("second", 1), ("exact", 4)]
    assert exact.num_cached_tokens == 4 and exact.block_table[0] == 0
    assert b.pool.ref_count(0) == 2
    b.pool.check_integrity()


def test_a_queued_prompt_keeps_its_cached_prefix_from_eviction_by_those_ahead() -> None:
    b = batcher(num_blocks=6, max_seqs=1)
    b.add(make("p", list(range(1, 10)), max_tokens=1))
    assert run_step(b) == [("p", 9)]  # caches [1..4] in block 0, [5..8] in block 1
    b.add(make("o", [60, 61, 62], max_tokens=1))
    assert run_step(b) == [("o", 3)]
    assert b.pool.free_block_ids() == [4, 5, 2, 1, 0, 3]  # p's prefix is now older than o's block
    r, q = make("r", list(range(40, 53)), max_tokens=1), make("q", [*range(1, 9), 30], max_tokens=1)
    b.add(r)
    b.add(q)  # q would hit blocks 0 and 1: marked most recently used
    assert b.pool.free_block_ids() == [4, 5, 2, 3, 1, 0]
    assert b.pool.ref_count(0) == b.pool.ref_count(1) == 0
    # r's 4 blocks come from the head: 4, 5, 2, 3 (under LRU alone: 4, 5, 2, 1, q's second block)
    assert run_step(b) == [("r", 13)]
    assert b.pool.free_block_ids() == [1, 0, 3, 2, 5, 4]  # r finished: its blocks freed in reverse
    assert run_step(b) == [("q", 1)]
    assert q.num_cached_tokens == 8  # both prefix blocks hit
    b.pool.check_integrity()


def test_stop_reasons_and_release() -> None:
    b = batcher(num_blocks=4)
    s = make("s", [1, 2], max_tokens=5)
    b.add(s)
    run_step(b, token=0)  # EOS
    assert s.finish_reason is FinishReason.STOP and s.output_token_ids == [0]
    assert b.pool.num_used_blocks == 0 and not b.has_work
    b.pool.check_integrity()


def test_max_num_seqs_limits_admission() -> None:
    b = batcher(num_blocks=10, max_seqs=1)
    b.add(make("a", [1]))
    b.add(make("b", [2]))
    assert run_step(b) == [("a", 1)]
    assert [s.request_id for s in b.waiting] == ["b"]
