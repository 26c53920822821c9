"""The benchmark suite's pure helpers: the routing oracle (exact, hand-computed on tiny token
lists), hit rates, the prefix-cache ideal, and the requests the two cache sections send."""

from __future__ import annotations

import pytest

from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.suite import prefix_cache, routing


def _record(request_id: str, prompt_tokens: int, cached_tokens: int | None) -> RequestRecord:
    return RequestRecord(request_id, 0.0, 1.0, (0.5,), prompt_tokens, 1, cached_tokens=cached_tokens)


# ---- routing.oracle_hit_tokens ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompts", "block_size", "expected"),
    [
        # the first prompt never hits
        ([[1, 2, 3, 4, 5]], 2, (0,)),
        # identical prompts: whole blocks before the last token only: (5 - 1) // 2 = 2 blocks
        ([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]], 2, (0, 4)),
        # even length, identical: (4 - 1) // 2 = 1 block, not 2
        ([[1, 2, 3, 4], [1, 2, 3, 4]], 2, (0, 2)),
        # shares 3 tokens = 1 whole block of 2 (the partial second block does not count)
        ([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9]], 2, (0, 2)),
        # the best earlier prompt counts, not the latest one
        ([[1, 2, 3, 4, 5, 6, 7], [1, 2, 8, 8, 8, 8, 8], [1, 2, 3, 4, 5, 6, 9]], 2, (0, 2, 6)),
        # an earlier prompt contributes its whole blocks only: [7, 8, 9] holds one block [7, 8]
        ([[7, 8, 9], [7, 8, 9, 1, 2]], 2, (0, 2)),
        # a match must start at token 0: same second block, different first
        ([[1, 2, 3, 4, 5], [0, 2, 3, 4, 5]], 2, (0, 0)),
        # two groups, block size 3
        ([[1, 1, 1, 2, 2, 2, 5], [4, 4, 4, 6], [1, 1, 1, 2, 2, 2, 7], [4, 4, 4, 6, 0, 0, 0, 1]], 3, (0, 0, 6, 3)),
        # hits also come from prompts that were themselves hits
        ([[5] * 8, [5] * 8 + [1], [5] * 12 + [2]], 4, (0, 8, 8)),
        # a prompt of one block only (len 4, block 4): nothing can be served before its last token
        ([[1, 2, 3, 4], [1, 2, 3, 4]], 4, (0, 0)),
        ([], 16, ()),
    ],
)
def test_oracle_hit_tokens(prompts: list[list[int]], block_size: int, expected: tuple[int, ...]) -> None:
    assert routing.oracle_hit_tokens(prompts, block_size) == expected


def test_oracle_on_the_routing_workload_is_the_whole_system_prompt() -> None:
    warmup, measured = routing.requests(16)
    hits = routing.oracle_hit_tokens([r.prompt_token_ids for r in (*warmup, *measured)], routing.BLOCK_SIZE)
    assert hits == (0,) * routing.NUM_PREFIXES + (768,) * 16


# ---- routing: requests and hit rate ----------------------------------------------------------
def test_routing_requests_warm_every_group_once_then_shuffle_deterministically() -> None:
    warmup, measured = routing.requests(24)
    assert [r.class_name for r in warmup] == [f"prefix-{g}" for g in range(routing.NUM_PREFIXES)]
    assert len(measured) == 24
    assert {len(r.prompt_token_ids) for r in (*warmup, *measured)} == {routing.PROMPT_LEN}
    groups = [r.class_name for r in measured]
    assert sorted(groups) == sorted(f"prefix-{i % routing.NUM_PREFIXES}" for i in range(routing.NUM_PREFIXES, 32))
    assert groups != [f"prefix-{i % routing.NUM_PREFIXES}" for i in range(routing.NUM_PREFIXES, 32)]
    assert routing.requests(24) == (warmup, measured)


def test_hit_rate_is_cached_over_prompt_tokens() -> None:
    assert routing.hit_rate([_record("a", 100, 50), _record("b", 300, 0)]) == 50 / 400


def test_hit_rate_refuses_a_record_without_cached_tokens() -> None:
    with pytest.raises(RuntimeError, match=r"no cached_tokens for \['b'\]"):
        routing.hit_rate([_record("a", 100, 50), _record("b", 100, None)])


# ---- prefix_cache ----------------------------------------------------------------------------
@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 1.0), (0.5, 2.0), (0.75, 4.0), (0.875, 8.0)])
def test_ideal_speedup(fraction: float, expected: float) -> None:
    assert prefix_cache.ideal_speedup(fraction) == expected


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_ideal_speedup_rejects_fractions_outside_0_1(fraction: float) -> None:
    with pytest.raises(ValueError, match="shared_fraction"):
        prefix_cache.ideal_speedup(fraction)


def test_interleave_alternates_cold_and_warm() -> None:
    cold = [WorkloadRequest(f"c{i}", (1,), 1) for i in range(2)]
    warm = [WorkloadRequest(f"w{i}", (2,), 1) for i in range(2)]
    assert [r.request_id for r in prefix_cache.interleave(cold, warm)] == ["c0", "w0", "c1", "w1"]
    with pytest.raises(ValueError, match="as many cold as warm"):
        prefix_cache.interleave(cold, warm[:1])


def test_prefix_cache_requests_share_exactly_the_prefix() -> None:
    warmup, cold, warm = prefix_cache.requests(4)
    prefix = warmup[1].prompt_token_ids
    assert len(prefix) == 768 and len(cold) == len(warm) == 4
    assert all(len(r.prompt_token_ids) == prefix_cache.PROMPT_LEN for r in (warmup[0], *cold, *warm))
    assert all(r.prompt_token_ids[:768] == prefix for r in warm)
    prompts = [r.prompt_token_ids for r in (*warmup, *prefix_cache.interleave(cold, warm))]
    # what the section checks against: 0 for every cold prompt, the whole prefix for every warm one
    assert routing.oracle_hit_tokens(prompts, prefix_cache.BLOCK_SIZE) == (0, 0) + (0, 768) * 4


def test_check_hits_raises_on_a_miss() -> None:
    prefix_cache.check_hits([_record("w0", 1024, 768)], 768)
    with pytest.raises(RuntimeError, match=r"1 of 2 requests did not report 768 cached tokens"):
        prefix_cache.check_hits([_record("w0", 1024, 768), _record("w1", 1024, 0)], 768)
