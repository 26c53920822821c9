"""Block pool: exact block ids, eviction order, ref counts, events; integrity after each case."""

from __future__ import annotations

import pytest

from tandem.common.workers import KVEventKind
from tandem.engine.block_pool import BlockPool, KVEvent, NoFreeBlocksError


@pytest.fixture
def pool() -> BlockPool:
    return BlockPool(6)


def test_allocation_order_and_ref_counts(pool: BlockPool) -> None:
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert [pool.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]
    assert pool.num_free_blocks == 1 and pool.num_used_blocks == 5
    pool.check_integrity()
    with pytest.raises(NoFreeBlocksError, match="need 2 blocks, 1 free"):
        pool.allocate(2)
    pool.free([4, 3, 2, 1, 0])
    assert pool.free_block_ids() == [5, 4, 3, 2, 1, 0]
    pool.check_integrity()


def test_cached_blocks_survive_free_and_are_hit(pool: BlockPool) -> None:
    blocks = pool.allocate(3)
    pool.cache_block(blocks[0], 111)
    pool.cache_block(blocks[1], 222)
    assert pool.take_events() == [KVEvent(KVEventKind.STORED, (111,)), KVEvent(KVEventKind.STORED, (222,))]
    pool.free(blocks[::-1])
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert pool.lookup_prefix([111, 222, 333]) == [0, 1]
    assert pool.lookup_prefix([222]) == [1]
    assert pool.lookup_prefix([999, 111]) == []
    pool.touch([0, 1])
    assert pool.ref_count(0) == 1 and pool.ref_count(1) == 1
    assert pool.free_block_ids() == [3, 4, 5, 2]
    pool.touch([0])
    assert pool.ref_count(0) == 2
    pool.free([0])
    assert pool.ref_count(0) == 1
    pool.check_integrity()
    pool.free([1, 0])
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    pool.check_integrity()


def test_lru_eviction_order_and_removed_events(pool: BlockPool) -> None:
    a = pool.allocate(2)  # [0, 1]
    b = pool.allocate(2)  # [2, 3]
    for block_id, h in zip(a + b, [10, 11, 20, 21]):
        pool.cache_block(block_id, h)
    pool.take_events()
    pool.free(a[::-1])  # free order 1, 0
    pool.free(b[::-1])  # free order 3, 2
    assert pool.free_block_ids() == [4, 5, 1, 0, 3, 2]
    # uncached blocks go first, then the least recently freed cached block
    assert pool.allocate(3) == [4, 5, 1]
    assert pool.take_events() == [KVEvent(KVEventKind.REMOVED, (11,))]
    assert pool.cached_hashes() == {10, 20, 21}
    assert pool.block_hash(1) is None
    assert pool.lookup_prefix([10, 11]) == [0]
    assert pool.allocate(2) == [0, 3]
    assert pool.take_events() == [KVEvent(KVEventKind.REMOVED, (10, 21))]
    assert pool.lookup_prefix([20]) == [2]
    pool.check_integrity()
    pool.free([4, 5, 1, 0, 3])
    pool.check_integrity()
    assert pool.num_used_blocks == 0


def test_refresh_moves_free_blocks_to_the_tail_in_order_and_takes_no_reference(pool: BlockPool) -> None:
    blocks = pool.allocate(4)  # [0, 1, 2, 3]
    for block_id, h in zip(blocks, [10, 11, 12, 13]):
        pool.cache_block(block_id, h)
    pool.free(blocks[::-1])
    pool.touch([3])  # in use: refresh leaves it alone
    assert pool.free_block_ids() == [4, 5, 2, 1, 0]
    pool.refresh([1, 0, 3])  # a queued prompt's prefix (0, 1), in reverse as for free
    assert pool.free_block_ids() == [4, 5, 2, 1, 0]  # already the most recent
    pool.refresh([2])
    assert pool.free_block_ids() == [4, 5, 1, 0, 2]
    assert [pool.ref_count(b) for b in range(6)] == [0, 0, 0, 1, 0, 0]
    assert pool.allocate(3) == [4, 5, 1]  # block 1 (hash 11) is now the least recent cached block
    assert pool.take_events() == [
        KVEvent(KVEventKind.STORED, (10,)),
        KVEvent(KVEventKind.STORED, (11,)),
        KVEvent(KVEventKind.STORED, (12,)),
        KVEvent(KVEventKind.STORED, (13,)),
        KVEvent(KVEventKind.REMOVED, (11,)),
    ]
    pool.check_integrity()


def test_duplicate_content_keeps_first_block(pool: BlockPool) -> None:
    first, second = pool.allocate(2)
    pool.cache_block(first, 7)
    pool.cache_block(second, 7)
    assert pool.block_hash(second) is None
    assert pool.lookup_prefix([7]) == [first]
    pool.free([second, first])
    pool.check_integrity()


def test_double_free_and_reset(pool: BlockPool) -> None:
    (b,) = pool.allocate(1)
    pool.cache_block(b, 5)
    assert pool.reset_prefix_cache() is False  # a block is in use
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free of block 0"):
        pool.free([b])
    pool.take_events()
    assert pool.reset_prefix_cache() is True
    assert pool.take_events() == [KVEvent(KVEventKind.CLEARED, ())]
    assert pool.lookup_prefix([5]) == []
    pool.check_integrity()


def test_prefix_caching_disabled() -> None:
    pool = BlockPool(2, enable_prefix_caching=False)
    (b,) = pool.allocate(1)
    pool.cache_block(b, 1)
    assert pool.lookup_prefix([1]) == [] and pool.take_events() == []
    pool.free([b])
    pool.check_integrity()


def test_check_integrity_detects_corruption(pool: BlockPool) -> None:
    pool.allocate(1)
    pool._ref_counts[0] = 0  # simulate a lost reference
    with pytest.raises(AssertionError, match="free 5 \\+ used 0 != total 6"):
        pool.check_integrity()
