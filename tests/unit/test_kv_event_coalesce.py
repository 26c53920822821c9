"""The KV event publisher's coalescing (worker/kv_events.py `coalesce`): adjacent events of
one kind become one, in order, chunked; CLEARED stays alone; the counts say how many events
each published one stands for."""

from __future__ import annotations

import pytest

from tandem.common.workers import KVEventKind
from tandem.engine.block_pool import KVEvent
from tandem.worker.kv_events import RESYNC_CHUNK_BLOCKS, coalesce

S, R, C = KVEventKind.STORED, KVEventKind.REMOVED, KVEventKind.CLEARED


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([], []),
        ([KVEvent(S, (1,))], [(S, (1,), 1)]),
        ([KVEvent(S, (1,)), KVEvent(S, (2,)), KVEvent(S, (3,))], [(S, (1, 2, 3), 3)]),
        (
            [KVEvent(S, (1,)), KVEvent(S, (2,)), KVEvent(R, (7, 8)), KVEvent(R, (9,)), KVEvent(S, (3,))],
            [(S, (1, 2), 2), (R, (7, 8, 9), 2), (S, (3,), 1)],
        ),
        (
            [KVEvent(S, (1,)), KVEvent(C, ()), KVEvent(C, ()), KVEvent(S, (2,)), KVEvent(S, (3,))],
            [(S, (1,), 1), (C, (), 1), (C, (), 1), (S, (2, 3), 2)],
        ),
        # a block stored, evicted and stored again keeps its order: the index ends up holding it
        ([KVEvent(S, (5,)), KVEvent(R, (5,)), KVEvent(S, (5,))], [(S, (5,), 1), (R, (5,), 1), (S, (5,), 1)]),
    ],
)
def test_coalesce_merges_adjacent_events_of_one_kind(
    events: list[KVEvent], expected: list[tuple[KVEventKind, tuple[int, ...], int]]
) -> None:
    assert coalesce(events) == expected


def test_coalesce_chunks_at_the_resync_chunk_size() -> None:
    n = RESYNC_CHUNK_BLOCKS + 3
    events = [KVEvent(S, (h,)) for h in range(n)]
    assert coalesce(events) == [
        (S, tuple(range(RESYNC_CHUNK_BLOCKS)), RESYNC_CHUNK_BLOCKS),
        (S, tuple(range(RESYNC_CHUNK_BLOCKS, n)), 3),
    ]
    # an event already larger than a chunk is published as it is
    big = KVEvent(R, tuple(range(n)))
    assert coalesce([KVEvent(R, (n,)), big]) == [(R, (n,), 1), (R, tuple(range(n)), 1)]
