"""Routing decisions as tables: worker views in, exact (kind, D, P, cached tokens) out."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler import (
    POLICIES,
    NoWorkerError,
    RouteKind,
    RouteRequest,
    SchedulerConfig,
    WorkerView,
    decide,
    make_policy,
    prefix_aware_cost,
)

P, D = WorkerRole.PREFILL, WorkerRole.DECODE
BLOCK = 16


def view(worker_id: str, cached: int = 0, load: WorkerLoad | None = None, fp: str = "aa") -> WorkerView:
    role = P if worker_id.startswith("p") else D
    return WorkerView(WorkerInfo(worker_id, role, f"{worker_id}:7000", fp, 1024, "t"), load, cached)


def load(waiting: int = 0, running: int = 0, queued: int = 0, used: int = 0, total: int = 100) -> WorkerLoad:
    return WorkerLoad(waiting, running, queued, used, total, 0.0)


def request(num_tokens: int = 1024, seq: int = 0) -> RouteRequest:
    return RouteRequest(f"r{seq}", num_tokens, tuple(range(1, num_tokens // BLOCK + 1)), seq)


ALWAYS_SPLIT = SchedulerConfig(policy="prefix_aware", local_prefill_max_tokens=0)


def config(policy: str, local_prefill_max_tokens: int = 0) -> SchedulerConfig:
    return SchedulerConfig(policy=policy, local_prefill_max_tokens=local_prefill_max_tokens)


# --- round robin ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq", "decode_id", "prefill_id"),
    [
        (0, "d-0", "p-0"),
        (1, "d-1", "p-1"),
        (2, "d-2", "p-0"),
        (3, "d-0", "p-1"),
        (4, "d-1", "p-0"),
        (5, "d-2", "p-1"),
        (1_000_001, "d-2", "p-1"),
    ],
)
def test_round_robin_rotates_by_seq_over_ids_in_sorted_order(seq, decode_id, prefill_id):
    prefill = [view("p-1"), view("p-0")]  # unsorted on purpose
    decode = [view("d-2"), view("d-0", cached=64), view("d-1", load=load(waiting=50))]
    decision = decide(request(seq=seq), prefill, decode, make_policy("round_robin"), config("round_robin"))
    assert (decision.kind, decision.decode.worker_id, decision.prefill.worker_id) == (
        RouteKind.DISAGGREGATED,
        decode_id,
        prefill_id,
    )


# --- least loaded --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decode", "expected"),
    [
        # fewest waiting + running wins, whatever the queue or cache
        ([view("d-0", 64, load(waiting=2, running=3)), view("d-1", 0, load(running=4, queued=9000))], "d-1"),
        # equal count: fewer queued prefill tokens
        ([view("d-0", 0, load(waiting=1, running=1, queued=500)), view("d-1", 0, load(running=2, queued=100))], "d-1"),
        # equal count and queue: lower KV usage
        ([view("d-0", 0, load(running=2, used=90)), view("d-1", 0, load(running=2, used=10))], "d-1"),
        # all equal: lowest worker id
        ([view("d-1", 0, load(running=2)), view("d-0", 0, load(running=2))], "d-0"),
        # no load published yet counts as idle
        ([view("d-0", 0, load(running=1)), view("d-1", 0, None)], "d-1"),
    ],
)
def test_least_loaded_picks_min_count_then_queue_then_kv_then_id(decode, expected):
    decision = decide(request(), [], decode, make_policy("least_loaded"), config("least_loaded"))
    assert (decision.kind, decision.decode.worker_id, decision.prefill) == (RouteKind.LOCAL_PREFILL, expected, None)


# --- prefix aware --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pool", "v", "cost"),
    [
        # uncached tokens count twice (UNCACHED_WEIGHT = 2)
        (P, view("p-0", 0, None), 2048.0),
        (P, view("p-0", 60, None), 128.0),
        (P, view("p-0", 64, None), 0.0),
        (P, view("p-0", 10, load(waiting=3, running=5, queued=300, used=25)), 2 * 864 + 300 + 256.0),
        (D, view("d-0", 10, load(waiting=3, running=5, queued=300, used=25)), 2 * 864 + (300 + 8 * 16) + 256.0),
        (D, view("d-0", 0, load(used=0, total=0)), 2048.0),  # empty pool: usage 0
    ],
)
def test_prefix_aware_cost_exact_values(pool, v, cost):
    assert prefix_aware_cost(request(1024), v, pool, ALWAYS_SPLIT) == cost


@pytest.mark.parametrize(
    ("prefill", "decode", "decode_id", "prefill_id", "d_cached", "p_cached"),
    [
        # D: d-0 holds 60 of 64 blocks, 4 running: 2 * 64 + 64 = 192 < 2048 for idle d-1.
        # P: p-1 holds the whole prompt, idle: cost 0.
        ([view("p-0"), view("p-1", 64)], [view("d-0", 60, load(running=4)), view("d-1")], "d-0", "p-1", 960, 1024),
        # d-0 holds 60 blocks but 5000 queued prefill tokens: 128 + 5000 + 0 > 2048 -> idle d-1.
        # p-1 holds everything but 2100 queued: 2100 > 2048 -> idle p-0.
        (
            [view("p-0"), view("p-1", 64, load(queued=2100))],
            [view("d-0", 60, load(queued=5000)), view("d-1")],
            "d-1",
            "p-0",
            0,
            0,
        ),
        # p-1 with 500 queued still beats recomputing: 500 < 2048.
        ([view("p-0"), view("p-1", 64, load(queued=500))], [view("d-0"), view("d-1")], "d-0", "p-1", 0, 1024),
        # KV usage: d-0 at 90% costs 2048 + 0.9 * 1024; d-1 holds 8 blocks at 0%: 2 * 896 -> d-1
        ([view("p-0")], [view("d-0", 0, load(used=90)), view("d-1", 8)], "d-1", "p-0", 128, 0),
        # exact tie: rotated by seq over the sorted ids; seq 0 -> lowest id
        ([view("p-1"), view("p-0")], [view("d-1", 4), view("d-0", 4)], "d-0", "p-0", 64, 0),
    ],
)
def test_prefix_aware_trades_cache_against_queue_and_kv(prefill, decode, decode_id, prefill_id, d_cached, p_cached):
    decision = decide(request(1024), prefill, decode, make_policy("prefix_aware"), ALWAYS_SPLIT)
    assert decision.kind is RouteKind.DISAGGREGATED
    assert (decision.decode.worker_id, decision.prefill.worker_id) == (decode_id, prefill_id)
    assert (decision.decode_cached_tokens, decision.prefill_cached_tokens) == (d_cached, p_cached)


def pick(decode: list[WorkerView], seq: int = 0) -> str:
    return make_policy("prefix_aware").pick(request(1024, seq), decode, D, ALWAYS_SPLIT).info.worker_id


IDLE = [view("d-1"), view("d-2"), view("d-3")]


@pytest.mark.parametrize(
    ("decode", "seq", "expected"),
    [
        # d-0 holds the prompt with 1500 queued (cost 1500 < 2048), but the bound is
        # 1.5 * mean(1500, 0, 0, 0) + 0.5 * 1024 = 1074.5: skipped; the idle tie rotates by seq
        ([view("d-0", 64, load(queued=1500)), *IDLE], 0, "d-1"),
        ([view("d-0", 64, load(queued=1500)), *IDLE], 1, "d-2"),
        ([view("d-0", 64, load(queued=1500)), *IDLE], 5, "d-3"),
        # 800 queued: bound 1.5 * 200 + 512 = 812, within it -> the holder
        ([view("d-0", 64, load(queued=800)), *IDLE], 1, "d-0"),
        # the bound counts one block per running or waiting sequence on a decode worker:
        # 752 + 4 * 16 = 816 <= 1.5 * 204 + 512 = 818 -> the holder;
        # 752 + 5 * 16 = 832 > 1.5 * 208 + 512 = 824 -> skipped
        ([view("d-0", 64, load(running=4, queued=752)), *IDLE], 0, "d-0"),
        ([view("d-0", 64, load(running=5, queued=752)), *IDLE], 0, "d-1"),
        # two holders: the one over the bound is skipped even though its cost is lower
        (
            [view("d-0", 64, load(queued=2000)), view("d-1", 60, load(queued=100)), view("d-2"), view("d-3")],
            0,
            "d-1",
        ),
    ],
)
def test_prefix_aware_skips_workers_over_the_load_bound(decode, seq, expected):
    assert pick(decode, seq) == expected


@pytest.mark.parametrize(("seq", "expected"), [(0, "d-0"), (1, "d-1"), (2, "d-2"), (3, "d-0"), (7, "d-1")])
def test_prefix_aware_rotates_exact_ties_by_seq(seq, expected):
    # nobody holds the prompt and all are idle: the same cost everywhere (input unsorted)
    assert pick([view("d-2"), view("d-0"), view("d-1")], seq) == expected
    # a cheaper worker is never part of the rotation
    assert pick([view("d-2"), view("d-0"), view("d-1"), view("d-3", 1)], seq) == "d-3"


@pytest.mark.parametrize(
    ("queued", "expected"),
    [
        # d-0 holds half the prompt: 2 * 512 + queued against 2 * 1024 for idle d-1
        (900, "d-0"),  # 1924 < 2048 (with weight 1, 1412 > 1024 sent it to d-1)
        (1024, "d-1"),  # 2048 == 2048: a tie, seq 1 -> the second of (d-0, d-1)
        (1100, "d-1"),  # 2124 > 2048 (within the bound 1.5 * 550 + 512 = 1337: by cost)
    ],
)
def test_prefix_aware_charges_uncached_tokens_twice(queued, expected):
    assert pick([view("d-0", 32, load(queued=queued)), view("d-1")], seq=1) == expected


# --- fingerprints, conditional disaggregation, exclusion -----------------------------------


@pytest.mark.parametrize(
    ("prefill", "kind", "prefill_id"),
    [
        # p-0 is better (holds the prompt) but has another layout: p-1 is chosen
        ([view("p-0", 64, fp="bb"), view("p-1", 0, load(queued=4000), fp="aa")], RouteKind.DISAGGREGATED, "p-1"),
        # only mismatched prefill workers: D prefills itself
        ([view("p-0", 64, fp="bb"), view("p-1", fp="cc")], RouteKind.LOCAL_PREFILL, None),
        # no prefill worker at all
        ([], RouteKind.LOCAL_PREFILL, None),
    ],
)
def test_prefill_is_only_paired_with_the_same_fingerprint(prefill, kind, prefill_id):
    for policy in sorted(POLICIES):
        decision = decide(request(), prefill, [view("d-0", fp="aa")], make_policy(policy), config(policy))
        assert decision.kind is kind, policy
        assert (decision.prefill.worker_id if decision.prefill else None) == prefill_id, policy
        assert decision.decode.worker_id == "d-0"


def test_decode_is_chosen_among_all_decode_workers_even_without_a_matching_prefill():
    # d-0 (layout bb) holds the prompt; the only prefill worker has layout aa.
    decode = [view("d-0", 64, fp="bb"), view("d-1", fp="aa")]
    decision = decide(request(), [view("p-0", fp="aa")], decode, make_policy("prefix_aware"), ALWAYS_SPLIT)
    assert (decision.kind, decision.decode.worker_id, decision.prefill) == (RouteKind.LOCAL_PREFILL, "d-0", None)
    assert decision.decode_cached_tokens == 1024


@pytest.mark.parametrize(
    ("threshold", "d_cached_blocks", "kind"),
    [
        (256, 49, RouteKind.LOCAL_PREFILL),  # uncached 1024 - 784 = 240 < 256
        (256, 48, RouteKind.DISAGGREGATED),  # uncached 256, not < 256
        (256, 64, RouteKind.LOCAL_PREFILL),  # fully cached at D
        (256, 0, RouteKind.DISAGGREGATED),
        (0, 64, RouteKind.DISAGGREGATED),  # 0: always split when a prefill worker is live
        (2048, 0, RouteKind.LOCAL_PREFILL),  # threshold above the prompt: always local
    ],
)
def test_local_prefill_when_uncached_tokens_at_decode_are_below_threshold(threshold, d_cached_blocks, kind):
    decision = decide(
        request(1024),
        [view("p-0")],
        [view("d-0", d_cached_blocks)],
        make_policy("prefix_aware"),
        config("prefix_aware", threshold),
    )
    assert decision.kind is kind
    assert decision.decode.worker_id == "d-0"
    assert decision.decode_cached_tokens == d_cached_blocks * BLOCK
    assert (decision.prefill.worker_id if decision.prefill else None) == (
        "p-0" if kind is RouteKind.DISAGGREGATED else None
    )


def test_partial_last_block_counts_as_uncached():
    # 1030 tokens: 64 full blocks, 6 tokens in a partial block that is never cached
    decision = decide(
        request(1030), [view("p-0")], [view("d-0", 64)], make_policy("prefix_aware"), config("prefix_aware", 7)
    )
    assert (decision.kind, decision.decode_cached_tokens) == (RouteKind.LOCAL_PREFILL, 1024)


@pytest.mark.parametrize(
    ("exclude", "decode_id", "prefill_id"),
    [
        (frozenset(), "d-0", "p-0"),
        (frozenset({"d-0"}), "d-1", "p-0"),
        (frozenset({"p-0"}), "d-0", "p-1"),
        (frozenset({"d-0", "p-0", "x-9"}), "d-1", "p-1"),
    ],
)
def test_excluded_workers_are_never_chosen(exclude, decode_id, prefill_id):
    prefill = [view("p-0", 64), view("p-1")]
    decode = [view("d-0", 32), view("d-1")]
    decision = decide(request(), prefill, decode, make_policy("prefix_aware"), ALWAYS_SPLIT, exclude)
    assert (decision.decode.worker_id, decision.prefill.worker_id) == (decode_id, prefill_id)


def test_all_prefill_excluded_falls_back_to_local_prefill():
    decision = decide(
        request(), [view("p-0")], [view("d-0")], make_policy("prefix_aware"), ALWAYS_SPLIT, frozenset({"p-0"})
    )
    assert (decision.kind, decision.decode.worker_id, decision.prefill) == (RouteKind.LOCAL_PREFILL, "d-0", None)


@pytest.mark.parametrize(
    ("decode", "exclude"),
    [
        ([], frozenset()),
        ([view("d-0"), view("d-1")], frozenset({"d-0", "d-1"})),
    ],
)
def test_no_routable_decode_worker_raises(decode, exclude):
    with pytest.raises(NoWorkerError, match="no routable decode worker for request r0"):
        decide(request(), [view("p-0")], decode, make_policy("prefix_aware"), ALWAYS_SPLIT, exclude)


def test_block_hashes_must_match_the_block_size():
    bad = RouteRequest("r0", 1024, tuple(range(32)), 0)  # hashed with block size 32
    with pytest.raises(ValueError, match="expected 64 at block_size 16"):
        decide(bad, [], [view("d-0")], make_policy("prefix_aware"), ALWAYS_SPLIT)


# --- registry and config -------------------------------------------------------------------


def test_make_policy_by_name():
    assert sorted(POLICIES) == ["least_loaded", "prefix_aware", "round_robin"]
    assert {name: make_policy(name).name for name in POLICIES} == {n: n for n in POLICIES}
    with pytest.raises(ValueError, match="valid: least_loaded, prefix_aware, round_robin"):
        make_policy("cache_aware")


@dataclass(frozen=True)
class BadConfig:
    field: str
    value: object
    message: str


@pytest.mark.parametrize(
    "case",
    [
        BadConfig("policy", "random", "unknown scheduler policy 'random'"),
        BadConfig("block_size", 0, "block_size must be an int >= 1"),
        BadConfig("local_prefill_max_tokens", -1, "local_prefill_max_tokens must be an int >= 0"),
        BadConfig("queue_weight", float("nan"), "queue_weight must be a finite number >= 0"),
        BadConfig("kv_weight", -0.5, "kv_weight must be a finite number >= 0"),
        BadConfig("refresh_interval_s", 0, "refresh_interval_s must be a finite number > 0"),
        BadConfig("speculative_ttl_s", float("inf"), "speculative_ttl_s must be a finite number"),
        BadConfig("kv_events_block_ms", 0, "kv_events_block_ms must be an int >= 1"),
        BadConfig("kv_events_block_ms", True, "kv_events_block_ms must be an int >= 1"),
    ],
    ids=lambda case: f"{case.field}={case.value!r}",
)
def test_config_rejects_bad_values(case):
    with pytest.raises(ValueError, match=case.message):
        SchedulerConfig(**{case.field: case.value})


def test_request_validation():
    with pytest.raises(ValueError, match="block_hashes must be a tuple"):
        RouteRequest("r", 16, [1], 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_prompt_tokens must be an int >= 0"):
        RouteRequest("r", -1, (), 0)
