"""The harder routing benchmark: its oracles on hand-made workloads (exact values), the
simulation's bookkeeping, and a quick-mode run of the suite section."""

from __future__ import annotations

from pathlib import Path

from tandem.loadtest.bench.routing_sim import (
    SimRequest,
    SimSpec,
    capacity_aware_hits,
    infinite_cache_hits,
    make_requests,
    replicas,
    simulate,
)
from tandem.loadtest.suite import routing_zipf
from tandem.loadtest.suite.context import BenchContext

SMALL = SimSpec(
    num_workers=4,
    num_groups=8,
    prefix_tokens=64,
    suffix_tokens=16,
    cache_groups=2,
    num_requests=200,
    warmup_requests=20,
)


def _requests(groups: list[int]) -> list[SimRequest]:
    """Hand-made: group g's prompt is 64 tokens of g then 16 tokens unique to the request."""
    from tandem.common.block_hash import block_extra, hash_blocks

    out = []
    for i, g in enumerate(groups):
        tokens = (g,) * 64 + tuple(range(1000 + 16 * i, 1016 + 16 * i))
        out.append(SimRequest(g, float(i), tokens, tuple(hash_blocks(tokens, 16, block_extra("sim")))))
    return out


def test_infinite_cache_oracle_counts_shared_leading_blocks() -> None:
    requests = _requests([0, 0, 1, 0, 1, 2])
    assert infinite_cache_hits(SMALL, requests) == [0, 64, 0, 64, 64, 0]


def test_capacity_aware_oracle_misses_once_per_replica() -> None:
    requests = _requests([0, 0, 0, 0, 0, 0, 1, 1])  # group 0: 6/8 of the load on 4 workers
    assert replicas(SMALL, requests, 1.5) == {0: 2, 1: 1}  # ceil(0.75 * 4 / 1.5) = 2
    assert capacity_aware_hits(SMALL, requests, 1.5) == [0, 0, 64, 64, 64, 64, 0, 64]


def test_capacity_aware_oracle_drops_groups_that_do_not_fit() -> None:
    spec = SimSpec(num_workers=1, num_groups=3, prefix_tokens=64, suffix_tokens=16, cache_groups=1)
    requests = _requests([0, 0, 0, 1, 1])  # one slot: only group 0 (the most popular) is placed
    assert capacity_aware_hits(spec, requests, 1.5) == [0, 64, 64, 0, 0]


def test_simulation_is_deterministic_and_bounded_by_the_oracle() -> None:
    requests = make_requests(SMALL)
    assert [r.group for r in requests] == [r.group for r in make_requests(SMALL)]
    bound = sum(infinite_cache_hits(SMALL, requests)[SMALL.warmup_requests :])
    for policy in ("prefix_aware", "least_loaded", "round_robin"):
        result = simulate(SMALL, requests, policy)  # asserts every pool drained
        assert len(result.hit_tokens) == len(result.ttft_s) == SMALL.num_requests - SMALL.warmup_requests
        assert 0 < sum(result.hit_tokens) <= bound
        assert all(t >= SMALL.overhead_s for t in result.ttft_s)
        assert len(result.mean_queued_tokens) == len(result.mean_work_tokens) == SMALL.num_workers
        assert result == simulate(SMALL, requests, policy)


def test_queued_work_is_the_exact_integral_of_the_uncached_tokens_left() -> None:
    from tandem.common.workers import WorkerInfo, WorkerRole
    from tandem.loadtest.bench.routing_sim import _Job, _work
    from tandem.scheduler.types import RouteDecision, RouteKind

    decode = WorkerInfo("d-00", WorkerRole.DECODE, "10.0.0.1:7000", "5e1a", 8, "sim")
    (request,) = _requests([0])  # 80 tokens, arrives at 0.0
    job = _Job(0, request, RouteDecision(RouteKind.LOCAL_PREFILL, decode, None, 0, 0), 80, 1.0, 3.0, 16)
    # 64 uncached tokens: waiting from 0 to 1 (64 token-s), then 64 -> 0 linearly until 3 (64)
    assert _work(job, 0.0, 4.0) == 128.0
    assert _work(job, 0.5, 1.0) == 32.0
    assert _work(job, 2.0, 2.5) == 32 * (1.0 - 0.25) / 2  # 32 tokens/s, left 32 at 2.0, 16 at 2.5
    assert _work(job, 3.0, 9.0) == 0.0


def test_quick_mode_section(tmp_path: Path) -> None:
    logs: list[str] = []
    section = routing_zipf.run(BenchContext(tmp_path, tmp_path, logs.append, quick=True))
    assert logs == [
        "routing_zipf: load 2.6, prefix_aware",
        "routing_zipf: load 2.6, least_loaded",
        "routing_zipf: load 2.6, round_robin",
    ]
    assert section.table[0] == routing_zipf.HEADER
    assert [row[:2] for row in section.table[1:]] == [
        ("2.6", "prefix_aware"),
        ("2.6", "least_loaded"),
        ("2.6", "round_robin"),
        ("2.6", "oracle: infinite cache"),
        ("2.6", "oracle: capacity-aware"),
    ]
    assert [f.name for f in section.figures] == [
        "load 2.6: prefix_aware hit rate / oracle",
        "load 2.6: prefix_aware max/mean queued work",
        "load 2.6: least_loaded hit rate / oracle",
        "load 2.6: round_robin hit rate / oracle",
    ]
    assert all(0 < f.value <= 1 for f in section.figures if "hit rate" in f.name)
