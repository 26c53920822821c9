"""The engine side of the prefill -> decode hand-off, in one process.

A prefill engine holds a finished prompt's blocks; a decode engine reserves blocks (reusing
its own prefix cache), receives the missing blocks' KV, commits, and generates. The tokens
equal a single engine's; a failed pull falls back to recompute with the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine import Engine, FinishReason, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engines(tiny_model_dir: Path) -> tuple[Engine, Engine, Engine]:
    make = lambda: Engine.from_pretrained(tiny_model_dir, num_blocks=64)  # noqa: E731
    return make(), make(), make()


def _prefill(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams) -> int:
    engine.add_request(request_id, prompt, params, hand_off=True)
    while True:
        for out in engine.step():
            assert out.request_id == request_id
            assert out.finish_reason is FinishReason.HANDOFF
            return out.new_token_ids[0]


def _copy_blocks(src: Engine, dst: Engine, src_ids: tuple[int, ...], dst_ids: tuple[int, ...]) -> None:
    for src_cache, dst_cache in zip(src.kv_caches, dst.kv_caches):
        dst_cache[:, list(dst_ids)] = src_cache[:, list(src_ids)]


def _drain(engine: Engine, request_id: str) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == request_id
            tokens.extend(out.new_token_ids)
    return tokens


def test_handoff_equals_single_engine_and_reuses_decode_cache(engines) -> None:
    prefill, decode, single = engines
    vocab = prefill.model_config.vocab_size
    shared, tail1, tail2 = random_prompts([48, 21, 9], vocab, seed=3)
    for i, prompt in enumerate([shared + tail1, shared + tail2]):
        expected = list(single.generate([prompt], GREEDY)[0].token_ids)
        rid = f"r{i}"
        first = _prefill(prefill, rid, prompt, GREEDY)
        held = prefill.held[rid]
        assert held.num_tokens == len(prompt) and len(held.block_ids) == -(-len(prompt) // 16)
        res = decode.reserve(rid, prompt, GREEDY, first)
        assert res is not None
        # the second prompt shares 3 full blocks with the first: only the other full blocks
        # are pulled (the partial last block is recomputed)
        assert res.num_cached_blocks == (0 if i == 0 else 3)
        assert res.num_full_blocks == len(prompt) // 16
        assert len(res.missing_block_ids) == len(prompt) // 16 - res.num_cached_blocks
        _copy_blocks(
            prefill, decode, held.block_ids[res.num_cached_blocks : res.num_full_blocks], res.missing_block_ids
        )
        assert prefill.release_held(rid) is True
        decode.commit(rid)
        assert [first] + _drain(decode, rid) == expected
    for engine in engines:
        engine.check_integrity()
        assert engine.is_drained()


def test_failed_pull_recomputes_with_the_same_tokens(engines) -> None:
    prefill, decode, single = engines
    (prompt,) = random_prompts([37], prefill.model_config.vocab_size, seed=4)
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=11, ignore_eos=True)
    expected = list(single.generate([prompt], params)[0].token_ids)
    first = _prefill(prefill, "r", prompt, params)
    res = decode.reserve("r", prompt, params, first)
    assert res is not None and decode.pool.num_used_blocks == 3
    # a pull in flight is a live request (a drain waits for it) but not batcher work yet
    assert (decode.num_requests, decode.has_unfinished()) == (1, False)
    decode.unreserve("r")  # nothing was copied: the decode engine recomputes prompt + first token
    assert [first] + _drain(decode, "r") == expected
    assert prefill.abort("r") is True  # a held lease can be aborted too
    for engine in engines:
        engine.check_integrity()
        assert engine.is_drained()


def test_first_token_that_finishes_frees_blocks(engines) -> None:
    prefill = engines[0]
    (prompt,) = random_prompts([20], prefill.model_config.vocab_size, seed=5)
    prefill.add_request("one", prompt, SamplingParams(max_tokens=1, temperature=0.0), hand_off=True)
    (out,) = prefill.step()
    assert out.finish_reason is FinishReason.LENGTH and "one" not in prefill.held
    assert prefill.is_drained()


def test_reserve_refused_when_pool_is_full(tiny_model_dir: Path) -> None:
    decode = Engine.from_pretrained(tiny_model_dir, num_blocks=6)
    first = decode.reserve("a", list(range(3, 63)), GREEDY, 5)
    assert first is not None and first.block_ids == (0, 1, 2, 3)
    assert decode.reserve("b", list(range(100, 140)), GREEDY, 5) is None  # 3 blocks, 2 free
    assert decode.abort("a") is True
    res = decode.reserve("b", list(range(100, 140)), GREEDY, 5)
    assert res is not None and res.block_ids == (4, 5, 3)
    assert decode.abort("b") is True
    decode.check_integrity()
    assert decode.is_drained()


def _handoff(prefill: Engine, decode: Engine, rid: str, prompt: list[int], params: SamplingParams) -> int:
    """Prefill on `prefill`, ship the KV into a reservation on `decode`, commit; the first token."""
    first = _prefill(prefill, rid, prompt, params)
    held = prefill.held[rid]
    res = decode.reserve(rid, prompt, params, first)
    assert res is not None
    _copy_blocks(prefill, decode, held.block_ids[res.num_cached_blocks : res.num_full_blocks], res.missing_block_ids)
    assert prefill.release_held(rid) is True
    decode.commit(rid)
    return first


def test_committed_handoffs_wait_for_a_slot_under_max_num_seqs(tiny_model_dir: Path) -> None:
    """A pulled prompt does not join the batch past `max_num_seqs`: it waits, holding its KV,
    and counts as waiting (the decode pool's queue-depth signal)."""
    prefill = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    decode = Engine.from_pretrained(tiny_model_dir, num_blocks=64, max_num_seqs=1)
    single = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    prompts = random_prompts([20, 33, 17], prefill.model_config.vocab_size, seed=6)
    expected = [list(o.token_ids) for o in single.generate(prompts, GREEDY)]
    firsts = [_handoff(prefill, decode, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    assert (decode.batcher.num_waiting, len(decode.batcher.running)) == (3, 0)
    tokens: dict[str, list[int]] = {f"r{i}": [first] for i, first in enumerate(firsts)}
    order: list[str] = []
    while decode.has_unfinished():
        outs = decode.step()
        assert len(decode.batcher.running) <= 1
        for out in outs:
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                order.append(out.request_id)
        assert decode.batcher.num_waiting + len(decode.batcher.running) == 3 - len(order)
    assert order == ["r0", "r1", "r2"]  # FIFO
    assert [tokens[f"r{i}"] for i in range(3)] == expected
    for engine in (prefill, decode):
        engine.check_integrity()
        assert engine.is_drained()


def test_ready_handoffs_that_fill_the_pool_do_not_stall(tiny_model_dir: Path) -> None:
    """Two pulled 32-token prompts fill a 4-block pool exactly; the first one's next token needs
    a fifth block. The newest is preempted (recomputed later) and both finish exactly."""
    prefill = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    decode = Engine.from_pretrained(tiny_model_dir, num_blocks=4, max_num_seqs=1)
    single = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = random_prompts([32, 32], prefill.model_config.vocab_size, seed=7)
    expected = [list(o.token_ids) for o in single.generate(prompts, params)]
    firsts = [_handoff(prefill, decode, f"r{i}", p, params) for i, p in enumerate(prompts)]
    assert decode.pool.num_free_blocks == 0
    tokens = {f"r{i}": [first] for i, first in enumerate(firsts)}
    for _ in range(100):
        if not decode.has_unfinished():
            break
        for out in decode.step():
            tokens[out.request_id].extend(out.new_token_ids)
    assert [tokens["r0"], tokens["r1"]] == expected
    assert decode.stats.num_preemptions == 1
    decode.check_integrity()
    assert decode.is_drained()


def test_partial_last_block_is_recomputed_never_trusted(engines) -> None:
    """Only full blocks (whose hashes the decode worker compares with the handle's) come from
    outside: the partial last block is recomputed after `commit`, so garbage there changes
    nothing, and the block it becomes is cached under KV this engine computed itself."""
    prefill, decode, single = engines
    (prompt,) = random_prompts([37], prefill.model_config.vocab_size, seed=6)
    expected = list(single.generate([prompt], GREEDY)[0].token_ids)
    first = _prefill(prefill, "tail", prompt, GREEDY)
    held = prefill.held["tail"]
    res = decode.reserve("tail", prompt, GREEDY, first)
    assert res is not None and (res.num_cached_blocks, res.num_full_blocks) == (0, 2)
    assert res.missing_block_ids == res.block_ids[:2] and len(res.block_ids) == 3
    _copy_blocks(prefill, decode, held.block_ids[:2], res.missing_block_ids)
    for cache in decode.kv_caches:  # whatever a peer might have put in the partial block
        cache[:, res.block_ids[2]] = 1e4
    assert prefill.release_held("tail") is True
    computed_before = decode.stats.num_prompt_tokens_computed
    decode.commit("tail")
    assert [first] + _drain(decode, "tail") == expected
    # the 5 prompt tokens of the partial block were computed here, not the 32 pulled ones
    assert decode.stats.num_prompt_tokens_computed - computed_before == 37 - 32
    for engine in engines:
        engine.check_integrity()
        assert engine.is_drained()
