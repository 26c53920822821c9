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
