"""The prefix index's recorded runs (scheduler/runs.py): `match` with runs equals a plain
per-block count under any sequence of events, and a recorded run is jumped, not rescanned."""

from __future__ import annotations

import random

import pytest

from tandem.common.block_hash import block_extra, hash_blocks
from tandem.common.workers import KVEventKind, KVEventRecord
from tandem.scheduler import PrefixIndex
from tandem.scheduler import index as index_module
from tandem.scheduler.runs import MIN_RUN_BLOCKS, RunTable

WORKERS = tuple(f"w-{i}" for i in range(6))


def chains(rng: random.Random) -> list[tuple[int, ...]]:
    """Prompts of 40-120 blocks that share prefixes of various lengths (real chained hashes)."""
    trunk = [rng.randrange(32_000) for _ in range(120 * 4)]
    prompts = []
    for _ in range(8):
        shared = rng.randrange(0, 100) * 4
        tokens = trunk[:shared] + [rng.randrange(32_000) for _ in range(rng.randrange(40, 121) * 4 - shared)]
        prompts.append(tuple(hash_blocks(tokens, 4, block_extra("runs"))))
    return prompts


def naive(held: dict[str, set[int]], prompt: tuple[int, ...], worker_ids: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for w in worker_ids:
        n = 0
        while n < len(prompt) and prompt[n] in held.get(w, ()):
            n += 1
        out[w] = n
    return out


@pytest.mark.parametrize("budget", [index_module.RECORD_BUDGET_BLOCKS, 3])
@pytest.mark.parametrize("seed", range(8))
def test_match_with_runs_equals_a_per_block_count(seed: int, budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "RECORD_BUDGET_BLOCKS", budget)  # 3: runs recorded piecemeal
    rng = random.Random(seed)
    prompts = chains(rng)
    index = PrefixIndex(speculative_ttl_s=0)  # confirmed entries only
    held: dict[str, set[int]] = {}
    epochs = dict.fromkeys(WORKERS, 1)
    seqs = dict.fromkeys(WORKERS, 0)
    for _ in range(400):
        w = rng.choice(WORKERS)
        prompt = rng.choice(prompts)
        op = rng.random()
        if op < 0.45:  # store a leading prefix, or a slice with a hole before it
            lo = 0 if rng.random() < 0.7 else rng.randrange(len(prompt))
            hashes = prompt[lo : rng.randrange(lo + 1, len(prompt) + 1)]
            seqs[w] += 1
            index.apply(KVEventRecord(w, epochs[w], seqs[w], KVEventKind.STORED, hashes))
            held.setdefault(w, set()).update(hashes)
        elif op < 0.8:  # evict a tail or a few blocks from the middle
            lo = rng.randrange(len(prompt))
            hashes = prompt[lo:] if rng.random() < 0.5 else tuple(rng.sample(prompt, 3))
            seqs[w] += 1
            index.apply(KVEventRecord(w, epochs[w], seqs[w], KVEventKind.REMOVED, hashes))
            held.setdefault(w, set()).difference_update(hashes)
        elif op < 0.85:
            seqs[w] += 1
            index.apply(KVEventRecord(w, epochs[w], seqs[w], KVEventKind.CLEARED, ()))
            held.pop(w, None)
        elif op < 0.9:  # restart: a new epoch drops everything
            epochs[w] += 1
            index.registered(w, epochs[w])
            seqs[w] = 0
            held.pop(w, None)
        elif op < 0.93:
            index.forget(w)
            held.pop(w, None)
            epochs[w], seqs[w] = epochs[w] + 1, 0
        for _ in range(2):  # twice: the second match walks the runs the first one recorded
            asked = tuple(rng.sample(WORKERS, rng.randrange(1, len(WORKERS) + 1)))
            probe = rng.choice(prompts)
            assert index.match(probe, asked) == naive(held, probe, asked)
    # the run table never outlives the index's entries: every back-reference is a held block
    assert set(index._runs._run_of) <= set(index._holders)
    assert len(index._runs) <= len(index._runs._run_of)


def test_a_recorded_run_is_found_only_where_the_prompt_holds_all_of_it() -> None:
    n = max(MIN_RUN_BLOCKS, 4)
    table = RunTable()
    prompt = tuple(range(100, 100 + 3 * n))
    table.record(prompt, n, n, 0b101)
    assert len(table) == 1
    assert table.find(prompt, n) == (n, 0b101)
    assert table.find(prompt, 0) is None  # no run starts at block 0
    assert table.find(prompt[: 2 * n - 1], n) is None  # the prompt ends inside the run
    diverged = prompt[: 2 * n - 1] + (7,) + prompt[2 * n :]
    assert table.find(diverged, n) is None  # another last block: another chain
    table.record(prompt, 0, MIN_RUN_BLOCKS - 1, 0b1)  # too short to record
    assert len(table) == 1
    table.invalidate((prompt[2 * n - 1],))  # one of its blocks changed
    assert len(table) == 0 and table.find(prompt, n) is None


def test_an_overlapping_record_replaces_the_older_run() -> None:
    n = max(MIN_RUN_BLOCKS, 4)
    table = RunTable()
    prompt = tuple(range(100, 100 + 4 * n))
    table.record(prompt, 0, 2 * n, 0b1)
    table.record(prompt, n, 2 * n, 0b11)  # shares half of it
    assert len(table) == 1
    assert table.find(prompt, 0) is None
    assert table.find(prompt, n) == (2 * n, 0b11)
    table.invalidate(prompt[:n])  # only the dropped run's back-references
    assert table.find(prompt, n) == (2 * n, 0b11)


def test_match_records_the_long_runs_of_a_prompt_and_events_drop_them() -> None:
    index = PrefixIndex(speculative_ttl_s=0)
    prompt = tuple(hash_blocks(list(range(64 * 16)), 16, block_extra("runs")))  # 64 blocks
    index.apply(KVEventRecord("w-0", 1, 1, KVEventKind.STORED, prompt))
    index.apply(KVEventRecord("w-1", 1, 1, KVEventKind.STORED, prompt[:40]))
    assert index.match(prompt, ("w-0", "w-1")) == {"w-0": 64, "w-1": 40}
    assert len(index._runs) == 2  # blocks 0-39 held by both, 40-63 by w-0 (MIN_RUN_BLOCKS <= 24)
    assert index.match(prompt, ("w-0", "w-1")) == {"w-0": 64, "w-1": 40}
    index.apply(KVEventRecord("w-1", 1, 2, KVEventKind.REMOVED, prompt[20:21]))
    assert len(index._runs) == 1  # the run over block 20 is gone
    assert index.match(prompt, ("w-0", "w-1")) == {"w-0": 64, "w-1": 20}


def test_one_match_records_at_most_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "RECORD_BUDGET_BLOCKS", 16)
    index = PrefixIndex(speculative_ttl_s=0)
    prompt = tuple(hash_blocks(list(range(64 * 16)), 16, block_extra("runs")))  # 64 blocks, one holder
    index.apply(KVEventRecord("w-0", 1, 1, KVEventKind.STORED, prompt))
    for recorded in (1, 2, 3, 4, 4):  # 16 more blocks of the one long run per match
        assert index.match(prompt, ("w-0",)) == {"w-0": 64}
        assert len(index._runs) == recorded
