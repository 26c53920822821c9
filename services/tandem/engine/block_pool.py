"""The block pool: ref-counted KV blocks with a prefix cache and LRU eviction.

Owner: the engine's step-loop thread (through the batcher); nothing else mutates it.

Lifecycle of a block:
1. Free and uncached, in the free queue.
2. `allocate()` pops it from the head of the free queue (ref count 1). If it still carried a
   hash from an earlier life, that cache entry is evicted first (a `removed` event).
3. When the block is full, `cache_block()` registers its hash so later requests can reuse it
   (a `stored` event).
4. `touch()` takes another reference to a cached block (a prefix-cache hit); a cached block
   whose ref count was 0 leaves the free queue.
5. `free()` drops references. A block whose ref count reaches 0 goes to the tail of the free
   queue but keeps its hash, so it can still be hit until it is reused (LRU eviction: the head
   of the free queue is the least recently freed block).

Invariants (`check_integrity`): every block is either in the free queue (ref 0) or used
(ref >= 1); the hash map and the blocks' hashes agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.common.block_hash import BlockHash
from tandem.common.workers import KVEventKind


@dataclass(frozen=True)
class KVEvent:
    """A change to the set of cached block hashes, for the cluster's prefix index."""

    kind: KVEventKind
    block_hashes: tuple[BlockHash, ...]


class NoFreeBlocksError(RuntimeError):
    """Raised by `allocate` when the pool cannot satisfy a request (callers check first)."""


class BlockPool:
    """Fixed set of `num_blocks` KV blocks numbered 0..num_blocks-1."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts: list[int] = [0] * num_blocks
        self._block_hash: list[BlockHash | None] = [None] * num_blocks
        # Free blocks in eviction order (head = next to allocate). Values unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._events: list[KVEvent] = []

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free, whether or not they are still cached)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one sequence, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._block_hash[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (the first is allocated next)."""
        return list(self._free)

    def cached_hashes(self) -> set[BlockHash]:
        return set(self._cached)

    def lookup_prefix(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest cached prefix of `block_hashes` (no references taken)."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        for h in block_hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    # ---- mutations -----------------------------------------------------------------------
    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one reference to each (cached) block, pulling free ones out of the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def refresh(self, block_ids: Sequence[int]) -> None:
        """Mark the free ones among `block_ids` (cached blocks a queued prompt will hit) most
        recently used: move them to the tail of the free queue, in the given order (callers
        pass a prefix in reverse, as to `free`, so that its first block is evicted last). No
        reference is taken: what is free stays free, only the eviction order changes."""
        free = self._free
        for block_id in block_ids:
            if block_id in free:
                free.move_to_end(block_id)

    def allocate(self, num_blocks: int) -> list[int]:
        """Pop `num_blocks` blocks from the head of the free queue, each with ref count 1."""
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"need {num_blocks} blocks, {len(self._free)} free")
        allocated: list[int] = []
        evicted: list[BlockHash] = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            old_hash = self._block_hash[block_id]
            if old_hash is not None:
                self._block_hash[block_id] = None
                if self._cached.get(old_hash) == block_id:
                    del self._cached[old_hash]
                    evicted.append(old_hash)
            self._ref_counts[block_id] = 1
            allocated.append(block_id)
        if evicted:
            self._events.append(KVEvent(KVEventKind.REMOVED, tuple(evicted)))
        return allocated

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. Callers pass a block table in reverse order so
        that a sequence's last (least shareable) blocks are evicted first."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Register a full, used block under `block_hash`. If another block already holds
        the same content, the new one stays uncached (it is freed normally later)."""
        if not self.enable_prefix_caching or self._block_hash[block_id] is not None:
            return
        if block_hash in self._cached:
            return
        self._block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        self._events.append(KVEvent(KVEventKind.STORED, (block_hash,)))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only allowed when no block is in use."""
        if self.num_used_blocks:
            return False
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        self._events.append(KVEvent(KVEventKind.CLEARED, ()))
        return True

    def take_events(self) -> list[KVEvent]:
        """Return and clear the KV events recorded since the last call."""
        events, self._events = self._events, []
        return events

    def check_integrity(self) -> None:
        """Raise AssertionError if any pool invariant is broken."""
        used = [i for i, c in enumerate(self._ref_counts) if c > 0]
        assert all(c >= 0 for c in self._ref_counts), "negative ref count"
        assert len(used) + len(self._free) == self.num_blocks, (
            f"free {len(self._free)} + used {len(used)} != total {self.num_blocks}"
        )
        for block_id in self._free:
            assert self._ref_counts[block_id] == 0, f"free block {block_id} has references"
        for h, block_id in self._cached.items():
            assert self._block_hash[block_id] == h, f"cache map disagrees for block {block_id}"
        for block_id, stored in enumerate(self._block_hash):
            if stored is not None:
                assert self._cached.get(stored) == block_id, f"block {block_id} hash not in cache map"
