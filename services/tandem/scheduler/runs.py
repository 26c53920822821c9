"""Runs of the prefix index (index.py): "blocks h_a .. h_b, a chain of n blocks, all have holder
mask m", recorded by `PrefixIndex.match` so that the next prompt with the same prefix skips the
run with one lookup instead of n.

Owner: one `PrefixIndex`, which calls every method under its lock (this class has none).
Why it is exact: block hashes are chained, so a prompt whose block at position p is h_a and
whose block at p + n - 1 is h_b holds exactly the run's blocks in between (`find` checks both
ends). A run stays valid while none of its blocks' masks changes: the index calls `invalidate`
with every hash whose confirmed mask it changes (STORED, REMOVED, CLEARED, restart, forget),
which drops the run covering it. Invalidation may be conservative (a stale back-reference can
drop a newer run with the same start), never late.

Layout:
- `by_start[h_a]` = (n, h_b, m). `PrefixIndex.match` reads it directly (`find` inlined in its
  loop); only this class writes it.
- `_run_of[h]` = h_a of the run that covers h (the back-references `invalidate` follows). A
  back-reference to a run that was dropped stays until its hash changes; every key is a hash
  the index holds, since a hash that leaves the index is invalidated.
Cost: `find` O(1); `record` O(n) in C (once per run, until one of its blocks changes);
`invalidate` O(hashes) in C.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import repeat

# Runs shorter than this are not recorded. 1: every run is; at 100 workers and a 32k-token prompt
# that is cheaper than rescanning the short runs between long ones (each rescan sets up a pass).
MIN_RUN_BLOCKS = 1


class RunTable:
    """Recorded runs of equal holder masks along block chains, by first block hash."""

    def __init__(self) -> None:
        self.by_start: dict[int, tuple[int, int, int]] = {}
        self._run_of: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.by_start)

    def starts_at(self, block_hash: int) -> bool:
        """Whether a run begins with `block_hash` (a cheap test before `find`)."""
        return block_hash in self.by_start

    def find(self, block_hashes: Sequence[int], position: int) -> tuple[int, int] | None:
        """(n, mask) of the run that covers `block_hashes[position : position + n]` exactly,
        or None (no run starts there, or the prompt ends or diverges inside it)."""
        run = self.by_start.get(block_hashes[position])
        if run is None:
            return None
        num_blocks, end, mask = run
        last = position + num_blocks - 1
        if last >= len(block_hashes) or block_hashes[last] != end:
            return None
        return num_blocks, mask

    def record(self, block_hashes: Sequence[int], position: int, num_blocks: int, mask: int) -> None:
        """Blocks `position .. position + num_blocks - 1` of `block_hashes` all have confirmed
        holder mask `mask` (non-zero) now. Runs that share a block with it are dropped first
        (their back-references are about to point here). No-op under MIN_RUN_BLOCKS."""
        if num_blocks < MIN_RUN_BLOCKS or num_blocks <= 0:
            return
        covered = block_hashes[position : position + num_blocks]
        run_of, runs = self._run_of, self.by_start
        if not run_of.keys().isdisjoint(covered):  # rare: most scans start where no run is
            for start in set(map(run_of.get, covered)):
                if start is not None:
                    runs.pop(start, None)
        start = covered[0]
        run_of.update(zip(covered, repeat(start)))
        runs[start] = (num_blocks, covered[-1], mask)

    def invalidate(self, block_hashes: Iterable[int]) -> None:
        """The holder masks of `block_hashes` changed: drop the runs that cover any of them."""
        run_of = self._run_of
        if not run_of:
            return
        runs = self.by_start
        for start in set(map(run_of.pop, block_hashes, repeat(None))):
            if start is not None:
                runs.pop(start, None)

    def clear(self) -> None:
        self.by_start.clear()
        self._run_of.clear()
