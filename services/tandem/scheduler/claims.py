"""Speculative claims of the prefix index (index.py): "worker w will soon hold the chain of
blocks ending at hash h", added when a request is routed to w.

Owner: one `PrefixIndex`, which calls every method under its lock (this class has none).
Because block hashes are chained, h alone names the whole chain, so a claim is one entry
however long the prompt: adding and expiring a claim is O(1). A routed prompt claims its chain
and its anchors (`add_prefixes`: O(log n) claims). A claim lives until the worker's STORED
event of h replaces it with a confirmed entry (`confirm`), at most one TTL; REMOVED events
never edit it.

Layout:
- `_masks[h]`: bitmask of the slots (the index's worker bits) claiming the chain ending at h.
- `_expiry[w][h]`: that claim's expiry; `_heap` orders (expiry_s, tie, w, h) for `expire`.
- `_length[h]`: the chain's length in blocks; `_lengths[n]`: how many claimed chains have
  length n. A chain of length n can end inside a prompt only at its block n - 1, so `ends`
  probes one position per distinct length instead of scanning the prompt.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from itertools import count


class ClaimTable:
    """Live speculative claims, by chain end, with their expiries."""

    def __init__(self) -> None:
        self._masks: dict[int, int] = {}
        self._expiry: dict[str, dict[int, float]] = {}
        self._heap: list[tuple[float, int, str, int]] = []
        self._tie = count()
        self._length: dict[int, int] = {}
        self._lengths: dict[int, int] = {}

    def add_prefixes(
        self, worker_id: str, bit: int, block_hashes: Sequence[int], expiry_s: float, holders: Mapping[int, int]
    ) -> None:
        """Claim the chain `block_hashes` and its anchors, its prefixes of 1, 2, 4, 8, ...
        blocks, for the worker with slot bit `bit`, skipping each chain whose last block the
        worker already holds (its bit in `holders`, the confirmed masks). Why anchors: a
        chain names one prompt, and the next prompt that shares only its prefix (the same
        system prompt, another question) would match no claim, so while the first prompt
        queues every one of them would miss on another worker; with anchors it matches at
        least half of the shared prefix. Why skip held chains: the claim would then outlive
        the blocks by up to one TTL if the worker evicted them (no STORED event replaces it),
        drawing the group back to a worker that no longer holds it."""
        num_blocks = len(block_hashes)
        n = 1
        while n < num_blocks:
            last = block_hashes[n - 1]
            if not holders.get(last, 0) & bit:
                self._claim(worker_id, bit, last, n, expiry_s)
            n *= 2
        if num_blocks and not holders.get(block_hashes[-1], 0) & bit:
            self._claim(worker_id, bit, block_hashes[-1], num_blocks, expiry_s)

    def confirm(self, worker_id: str, bit: int, block_hashes: Sequence[int]) -> None:
        """The worker stored `block_hashes` (a STORED event): its claims on chains ending at
        them are replaced by confirmed entries, which REMOVED events keep true."""
        claims = self._expiry.get(worker_id)
        if not claims:
            return
        for last in block_hashes:
            if claims.pop(last, None) is not None:  # its heap entry goes stale and is skipped
                self._clear(last, bit)
        if not claims:
            del self._expiry[worker_id]

    def add(self, worker_id: str, bit: int, block_hashes: Sequence[int], expiry_s: float) -> None:
        """Claim the chain `block_hashes` (non-empty, from the prompt's first block) for the
        worker with slot bit `bit` until `expiry_s`; a later claim of the same chain by the
        same worker replaces the expiry."""
        self._claim(worker_id, bit, block_hashes[-1], len(block_hashes), expiry_s)

    def _claim(self, worker_id: str, bit: int, last: int, length: int, expiry_s: float) -> None:
        """`add` of the chain of `length` blocks ending at `last`. A claim pushes a heap entry
        when it is new or its expiry moves earlier; when it moves later (a group's prompts
        claim the same anchors again and again), its entry is pushed again when it comes due
        (`expire`), so the heap holds about one entry per live claim, not one per claim made."""
        claims = self._expiry.get(worker_id)
        if claims is None:
            claims = self._expiry[worker_id] = {}
        old = claims.get(last)
        claims[last] = expiry_s
        if old is None:
            mask = self._masks.get(last)
            if mask is None:
                mask = 0
                self._length[last] = length
                self._lengths[length] = self._lengths.get(length, 0) + 1
            self._masks[last] = mask | bit
        elif expiry_s >= old:
            return
        heapq.heappush(self._heap, (expiry_s, next(self._tie), worker_id, last))

    def expire(self, now_s: float, bits: Mapping[str, int]) -> int:
        """Drop the claims whose expiry is <= `now_s` (`bits`: worker id -> slot bit); return
        how many."""
        expired = 0
        heap = self._heap
        while heap and heap[0][0] <= now_s:
            expiry_s, _, worker_id, last = heapq.heappop(heap)
            claims = self._expiry.get(worker_id)
            if claims is None:  # dropped
                continue
            current = claims.get(last)
            if current is None or current < expiry_s:  # dropped, or its earlier entry is due first
                continue
            if current > expiry_s:  # claimed again since: due later (see `_claim`)
                heapq.heappush(heap, (current, next(self._tie), worker_id, last))
                continue
            del claims[last]
            if not claims:
                del self._expiry[worker_id]
            self._clear(last, bits[worker_id])
            expired += 1
        return expired

    def drop(self, worker_id: str, bit: int) -> None:
        """Drop every claim of the worker (its heap entries go stale and are skipped)."""
        for last in self._expiry.pop(worker_id, {}):
            self._clear(last, bit)

    def count(self, worker_id: str) -> int:
        """The worker's live claims."""
        return len(self._expiry.get(worker_id, ()))

    def ends(self, block_hashes: Sequence[int]) -> list[tuple[int, int]]:
        """(n, mask) for each claimed chain that is the prompt's first n blocks: `mask` holds
        the claimants' bits. O(distinct claimed lengths), or O(num_blocks) in C when there
        are more distinct lengths than blocks."""
        masks = self._masks
        if not masks:
            return []
        num_blocks = len(block_hashes)
        lengths = [n for n in self._lengths if n <= num_blocks]
        if len(lengths) < num_blocks:
            return [(n, masks[block_hashes[n - 1]]) for n in lengths if block_hashes[n - 1] in masks]
        return [(block_hashes.index(last) + 1, masks[last]) for last in masks.keys() & block_hashes]

    def _clear(self, last: int, bit: int) -> None:
        mask = self._masks.get(last, 0) & ~bit
        if mask:
            self._masks[last] = mask
            return
        if self._masks.pop(last, None) is not None:
            length = self._length.pop(last)
            left = self._lengths[length] - 1
            if left:
                self._lengths[length] = left
            else:
                del self._lengths[length]
