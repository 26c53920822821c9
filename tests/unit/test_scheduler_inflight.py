"""The gateway's in-flight table (scheduler/inflight.py): published load + own work in, the
adjusted load the policies see out (exact values)."""

from __future__ import annotations

import pytest

from tandem.common.workers import WorkerLoad
from tandem.scheduler.inflight import InflightTable


def published(queued: int, running: int = 1, timestamp_s: float = 10.0) -> WorkerLoad:
    return WorkerLoad(2, running, queued, 5, 100, timestamp_s)


# (own prompts in flight on w as (uncached, full) pairs, published queue) -> adjusted queue
@pytest.mark.parametrize(
    ("own", "queued", "expected"),
    [
        ([], 700, 700),  # nothing of ours: the published queue as is
        ([(64, 576)], 576, 64),  # our waiting hit, reported at full length, counts uncached
        ([(64, 576), (64, 576)], 1152, 128),
        ([(64, 576)], 1000, 64 + 424),  # 424 tokens of other gateways' work
        ([(64, 576), (576, 576)], 100, 640),  # ours already running: never below our own work
        ([(0, 512)], 512, 0),  # a prompt it holds whole
    ],
)
def test_own_prompts_count_at_their_uncached_length(own, queued, expected) -> None:
    table = InflightTable()
    for uncached, full in own:
        table.begin("w", uncached, "d", full)
    adjusted = table.adjust("w", published(queued))
    assert adjusted == WorkerLoad(2, 1, expected, 5, 100, 10.0)


def test_prefill_done_releases_both_counts_and_drops_a_stale_queue() -> None:
    table = InflightTable()
    table.begin("w", 64, "d", 576)
    table.begin("w", 576, "d", 576)
    table.prefill_done("w", 64, 11.0, 576)
    assert table.adjust("w", published(1000)) == WorkerLoad(2, 1, 576, 5, 100, 10.0)  # published before 11.0
    assert table.adjust("w", published(1000, timestamp_s=12.0)) == WorkerLoad(2, 1, 576 + 424, 5, 100, 12.0)
    table.prefill_done("w", 576, 13.0, 576)
    assert table.touched() == frozenset({"w", "d"})  # "d": two open streams; "w": last_done_s
    assert table.adjust("w", published(300, timestamp_s=14.0)) == WorkerLoad(2, 1, 300, 5, 100, 14.0)
    assert table.adjust("w", None) is None
    assert table.adjust("d", published(0)) == WorkerLoad(2, 2, 0, 5, 100, 10.0)  # its two streams


def test_a_fully_cached_prompt_is_still_tracked() -> None:
    table = InflightTable()
    table.begin("w", 0, "d", 512)
    assert table.touched() == frozenset({"w", "d"})
    assert table.adjust("w", published(512)) == WorkerLoad(2, 1, 0, 5, 100, 10.0)


# --- through route_on: the decision the correction changes ------------------------------------


def _route(own_waiting: int, published_queue: int) -> str:
    """Two colocated workers; w-0 holds 32 of the prompt's 36 blocks (576 tokens), w-1 nothing.
    `own_waiting` of our earlier prompts of the same prefix wait on w-0 (64 uncached tokens
    each), and w-0 publishes `published_queue` queued tokens (waiting prompts at full length)."""
    from tandem.common.workers import KVEventKind, KVEventRecord, WorkerInfo, WorkerRole
    from tandem.scheduler.config import SchedulerConfig
    from tandem.scheduler.index import PrefixIndex
    from tandem.scheduler.policies import make_policy
    from tandem.scheduler.registry import RegistrySnapshot
    from tandem.scheduler.routing import route_on
    from tandem.scheduler.types import RouteRequest

    hashes = tuple(range(1, 37))
    infos = [WorkerInfo(f"w-{i}", WorkerRole.DECODE, f"10.0.0.{i}:7000", "ff", 1024, "m") for i in range(2)]
    loads = {
        "w-0": WorkerLoad(own_waiting, 0, published_queue, 0, 1024, 10.0),
        "w-1": WorkerLoad(0, 0, 0, 0, 1024, 10.0),
    }
    index = PrefixIndex(speculative_ttl_s=0)
    index.apply(KVEventRecord("w-0", 1, 1, KVEventKind.STORED, hashes[:32]))
    table = InflightTable()
    for _ in range(own_waiting):
        table.begin("w-0", 64, "w-0", 576)
    config = SchedulerConfig(local_prefill_max_tokens=0)
    request = RouteRequest("r", 576, hashes, 5)
    snapshot = RegistrySnapshot.of(infos, loads, 10.0)
    return route_on(
        snapshot, index, request, make_policy("prefix_aware"), config, 10.0, inflight=table
    ).decode.worker_id


@pytest.mark.parametrize(
    ("own_waiting", "published_queue", "expected"),
    [
        # 3 of ours wait on w-0, published at 3 x 576 = 1728: counted as 3 x 64 = 192, so w-0
        # costs 2 * 64 + 192 + (3 running + 3 waiting) * 16 = 416 < 2 * 576 for w-1 (counted at
        # 192 + 1728, as before the correction, it cost 2144: w-1)
        (3, 1728, "w-0"),
        # 6 of ours: load 384 + 12 * 16 = 576, within the bound 1.5 * 288 + 288 = 720; cost 704
        (6, 3456, "w-0"),
        # plus 2000 tokens of other gateways' work: load 2576 > 1.5 * 1288 + 288 = 2220
        (6, 3456 + 2000, "w-1"),
    ],
)
def test_route_counts_own_waiting_prompts_at_their_uncached_length(own_waiting, published_queue, expected) -> None:
    assert _route(own_waiting, published_queue) == expected
