"""ClaimTable (speculative claims by chain end, with anchors) and PrefixIndex.match against a
brute-force reference under random events and claims: the faster walk and claim lookup decide
exactly what the definition says."""

from __future__ import annotations

import random

import pytest

from tandem.common.workers import KVEventKind, KVEventRecord
from tandem.scheduler import PrefixIndex
from tandem.scheduler.claims import ClaimTable

PROMPT = (101, 102, 103, 104, 105)


def test_ends_probes_one_position_per_claimed_length() -> None:
    table = ClaimTable()
    table.add("a", 0b01, PROMPT[:2], 10.0)
    table.add("b", 0b10, PROMPT, 10.0)
    table.add("b", 0b10, (101, 999), 10.0)  # same length as PROMPT[:2], another chain
    table.add("a", 0b01, (7, 8, 9, 10, 11, 12), 10.0)  # longer than the prompt
    assert sorted(table.ends(PROMPT)) == [(2, 0b01), (5, 0b10)]
    assert table.ends((101,)) == []
    assert (table.count("a"), table.count("b")) == (2, 2)


def test_ends_scans_when_lengths_outnumber_blocks() -> None:
    table = ClaimTable()
    for n in range(1, 6):
        table.add("a", 0b1, tuple(range(500 + n, 500 + n + n)), 10.0)  # 5 lengths, none in PROMPT
    table.add("b", 0b10, PROMPT[:1], 10.0)
    assert table.ends(PROMPT[:3]) == [(1, 0b10)]  # 5 distinct lengths >= 3 blocks: scan


def test_expired_and_dropped_claims_leave_nothing() -> None:
    table = ClaimTable()
    table.add("a", 0b01, PROMPT[:2], 5.0)
    table.add("b", 0b10, PROMPT[:2], 8.0)
    table.add("b", 0b10, PROMPT, 8.0)
    assert table.expire(5.0, {"a": 0b01, "b": 0b10}) == 1
    assert sorted(table.ends(PROMPT)) == [(2, 0b10), (5, 0b10)]
    table.drop("b", 0b10)
    assert table.ends(PROMPT) == [] and table.count("b") == 0
    assert table.expire(100.0, {"a": 0b01, "b": 0b10}) == 0  # b's heap entries are stale
    assert (table._masks, table._length, table._lengths, table._expiry) == ({}, {}, {}, {})


def test_add_prefixes_claims_anchors_but_not_what_the_worker_holds() -> None:
    table = ClaimTable()
    chain = tuple(range(201, 211))  # 10 blocks: anchors 1, 2, 4, 8, and the chain itself
    table.add_prefixes("a", 0b01, chain, 10.0, {})
    assert table.count("a") == 5
    assert sorted(table.ends(chain)) == [(1, 0b01), (2, 0b01), (4, 0b01), (8, 0b01), (10, 0b01)]
    assert sorted(table.ends((201, 202, 203, 204, 205, 999))) == [(1, 0b01), (2, 0b01), (4, 0b01)]
    # b holds blocks 202 and 208 (confirmed): the chains ending there are not claimed
    table.add_prefixes("b", 0b10, chain, 10.0, {202: 0b10, 208: 0b11, 204: 0b01})
    assert sorted(table.ends(chain)) == [(1, 0b11), (2, 0b01), (4, 0b11), (8, 0b01), (10, 0b11)]
    table.add_prefixes("b", 0b10, (7,), 10.0, {})  # one block: just the chain
    assert table.count("b") == 4


def test_confirm_replaces_the_claims_on_stored_chain_ends() -> None:
    table = ClaimTable()
    table.add_prefixes("a", 0b01, PROMPT, 10.0, {})  # anchors 1, 2, 4 and the chain (5)
    table.add_prefixes("b", 0b10, PROMPT, 10.0, {})
    table.confirm("a", 0b01, (102, 103, 105))  # a stored blocks 2, 3 and 5
    assert sorted(table.ends(PROMPT)) == [(1, 0b11), (2, 0b10), (4, 0b11), (5, 0b10)]
    assert (table.count("a"), table.count("b")) == (2, 4)
    table.confirm("a", 0b01, (101, 104))
    table.confirm("c", 0b100, PROMPT)  # no claims: nothing to do
    assert table.count("a") == 0 and "a" not in table._expiry
    assert table.expire(10.0, {"a": 0b01, "b": 0b10}) == 4  # a's heap entries are stale
    assert (table._masks, table._length, table._lengths, table._expiry) == ({}, {}, {}, {})


def test_claiming_again_later_pushes_no_heap_entry_until_the_old_one_is_due() -> None:
    table = ClaimTable()
    bits = {"a": 0b1}
    for i in range(100):  # a group's prompts claim the same anchor again and again
        table.add("a", 0b1, PROMPT[:2], 10.0 + i)
    assert len(table._heap) == 1 and table.count("a") == 1
    assert table.expire(10.0, bits) == 0  # due at 109 now: pushed again
    assert [e[0] for e in table._heap] == [109.0]
    table.add("a", 0b1, PROMPT[:2], 50.0)  # earlier (a clock that went back): its own entry
    assert sorted(e[0] for e in table._heap) == [50.0, 109.0]
    assert table.expire(50.0, bits) == 1 and table.ends(PROMPT) == []
    assert table.expire(109.0, bits) == 0 and table._heap == []


def _reference(
    held: dict[str, set[int]], claims: dict[tuple[str, tuple[int, ...]], float], prompt: tuple[int, ...], now_s: float
) -> dict[str, int]:
    out = {}
    for worker, hashes in held.items():
        run = 0
        while run < len(prompt) and prompt[run] in hashes:
            run += 1
        for (w, chain), expiry_s in claims.items():
            if w == worker and expiry_s > now_s and prompt[: len(chain)] == chain:
                run = max(run, len(chain))
        out[worker] = run
    return out


@pytest.mark.parametrize("seed", range(12))
def test_match_equals_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    workers = [f"w{i}" for i in range(rng.randint(1, 70))]
    chains = [tuple(rng.getrandbits(64) for _ in range(rng.randint(1, 40))) for _ in range(4)]
    chains += [c[: rng.randint(1, len(c))] + tuple(rng.getrandbits(64) for _ in range(5)) for c in chains]
    index = PrefixIndex(speculative_ttl_s=3.0)
    held: dict[str, set[int]] = {w: set() for w in workers}
    claims: dict[tuple[str, tuple[int, ...]], float] = {}
    seqs = dict.fromkeys(workers, 0)
    now_s = 0.0
    for _ in range(300):
        now_s += rng.random()
        worker, chain = rng.choice(workers), rng.choice(chains)
        op = rng.random()
        if op < 0.45:  # stores a random slice (holes happen)
            lo = rng.randint(0, len(chain) - 1)
            hashes = chain[lo : rng.randint(lo + 1, len(chain))]
            kind = KVEventKind.STORED
            held[worker].update(hashes)
        elif op < 0.6:
            hashes = tuple(rng.sample(chain, rng.randint(1, len(chain))))
            kind = KVEventKind.REMOVED
            held[worker].difference_update(hashes)
        else:  # claims the prefix and its anchors of 1, 2, 4, ... blocks, but none it holds
            prefix = chain[: rng.randint(1, len(chain))]
            index.add_speculative(worker, prefix, now_s)
            for n in [*(1 << k for k in range(len(prefix).bit_length()) if 1 << k < len(prefix)), len(prefix)]:
                if prefix[n - 1] not in held[worker]:
                    claims[(worker, prefix[:n])] = now_s + 3.0
            continue
        if kind is KVEventKind.STORED:  # confirmed entries replace the claims they fulfil
            claims = {(w, c): e for (w, c), e in claims.items() if w != worker or c[-1] not in hashes}
        seqs[worker] += 1
        index.apply(KVEventRecord(worker, 1, seqs[worker], kind, hashes))
        if rng.random() < 0.3:
            index.expire(now_s)
            prompt = rng.choice(chains)
            assert index.match(prompt, workers) == _reference(held, claims, prompt, now_s)
