"""The prefix index: which workers hold which block hashes (DESIGN.md section 5).

Owner: one `Scheduler`. Writers: its KV event follower thread (`apply`, `expire`), its
registry refresher thread (`forget`, `registered`), and `Scheduler.route` (`expire`, `add_speculative`).
Reader: `Scheduler.route` (`match`, which also records runs in `_runs`). Thread safety:
every public method takes the one `threading.Lock` of the index for its whole body, so each
call is atomic; `apply` takes one record per call, so the follower never holds the lock for a
whole batch.

Layout (all under the lock):
- Each worker the index knows gets a slot, a bit position. `_holders` maps a block hash to the
  bitmask (a Python int) of the workers whose KV events say they hold it (confirmed entries).
  `match` groups the prompt's runs of equal masks and ANDs once per run; the long runs it
  finds are recorded (runs.py, `_runs`), so the next prompt with that prefix jumps over each
  of them with one lookup, until an event changes one of their blocks.
- Speculative entries are claims (claims.py, `_claims`): "worker w will soon hold the chain of
  blocks ending at hash h" (a request was just routed there): a routed prompt claims its
  chain and its anchors (its prefixes of 1, 2, 4, ... blocks), O(log n) entries, but none
  that w already holds. A claim lasts until w's STORED event of its last block replaces it
  with a confirmed entry, or `speculative_ttl_s`; never edited by REMOVED events.
- `_events` (event_positions.py) = (epoch, seq) of the last event applied for w. A new epoch means the worker
  restarted with an empty cache: its confirmed entries and claims are dropped first. The new
  epoch is learnt from whichever comes first: its first KV event, or its registration
  (`registered`, from the registry refresher: a worker restarted under the same id before its
  key expired publishes no event until it caches a block, and meanwhile its old entries would
  attract prefixes it no longer holds). A seq gap within an epoch (trimmed stream, lost XADD,
  or an event read before the first one of this scheduler) is logged and counted in
  `num_gaps`; the entries are kept, since they are still the best guess, and the next CLEARED
  or new epoch resets them. `mode` sums this up as the routing mode.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from itertools import groupby, islice, repeat
from operator import or_

from tandem.common.gateway_view import RoutingMode
from tandem.common.workers import KVEventKind, KVEventRecord
from tandem.scheduler.claims import ClaimTable
from tandem.scheduler.event_positions import EventPositions, Position
from tandem.scheduler.runs import RunTable

# Blocks of runs one `match` records at most (runs.py; recording costs about as much again as
# scanning): a prompt whose runs are not recorded yet pays for at most this many, and the next
# match of the same prefix records the next ones. Each run is charged its length plus
# RECORD_COST_BLOCKS (its fixed cost), so many short runs are also spread over several matches.
RECORD_BUDGET_BLOCKS = 128
RECORD_COST_BLOCKS = 16


class PrefixIndex:
    """Block hash -> workers that hold it, fed by KV events and by routing decisions."""

    def __init__(self, speculative_ttl_s: float) -> None:
        if not speculative_ttl_s >= 0:
            raise ValueError(f"speculative_ttl_s must be >= 0, got {speculative_ttl_s!r}")
        self._ttl_s = speculative_ttl_s
        self._lock = threading.Lock()
        self._holders: dict[int, int] = {}  # block hash -> bitmask of slots (confirmed)
        self._confirmed: dict[str, set[int]] = {}  # worker -> its confirmed hashes
        self._claims = ClaimTable()
        self._runs = RunTable()  # runs of equal confirmed masks, recorded by `match`
        self._bit: dict[str, int] = {}  # worker id -> 1 << slot
        self._owner: dict[int, str] = {}  # 1 << slot -> worker id
        self._free_slots: list[int] = []  # slots of forgotten workers, reused first
        self._events = EventPositions()  # worker -> (epoch, last seq), and seq gaps

    # --- writers -----------------------------------------------------------------------------

    def apply(self, record: KVEventRecord) -> None:
        """Apply one KV event: STORED adds, REMOVED removes, CLEARED drops all of the worker's
        entries and claims. Stale or duplicate events (by epoch and seq) are ignored."""
        worker_id = record.worker_id
        with self._lock:
            position = self._events.advance(record)
            if position is Position.STALE:
                return
            if position is Position.RESTARTED:
                self._drop_entries(worker_id)
            if record.kind is KVEventKind.CLEARED:  # everything before it is moot: a complete view
                self._drop_entries(worker_id)
                self._events.clear_gaps(worker_id)
                return
            bit = self._bit_for(worker_id)
            confirmed = self._confirmed.setdefault(worker_id, set())
            hashes = record.block_hashes
            holders = self._holders
            self._runs.invalidate(hashes)
            if record.kind is KVEventKind.STORED:
                confirmed.update(hashes)
                self._claims.confirm(worker_id, bit, hashes)
                holders.update(zip(hashes, map(or_, map(holders.get, hashes, repeat(0)), repeat(bit))))
            else:  # REMOVED
                confirmed.difference_update(hashes)
                for h in hashes:
                    _clear_bit(holders, h, bit)

    def add_speculative(self, worker_id: str, block_hashes: Sequence[int], now_s: float) -> None:
        """Claim that `worker_id` will soon hold `block_hashes`, the chain of a prompt's
        leading blocks (from its first block on), because a request was routed there; and
        its anchors, so that the next prompt sharing only a prefix matches it
        (`ClaimTable.add_prefixes`). Chains the worker already holds are not claimed.

        A claim counts in `match` until the worker's STORED event of its last block confirms
        it (`apply`), or until `now_s + speculative_ttl_s`; claiming the same chain again
        pushes its expiry. Also expires what is due at `now_s`. O(log num_blocks). No-op
        when the TTL is 0 or there are no blocks.
        """
        if self._ttl_s == 0 or not block_hashes:
            return
        with self._lock:
            self._claims.expire(now_s, self._bit)
            bit = self._bit_for(worker_id)
            self._claims.add_prefixes(worker_id, bit, block_hashes, now_s + self._ttl_s, self._holders)

    def expire(self, now_s: float) -> int:
        """Drop the claims whose expiry is <= `now_s`; return how many."""
        with self._lock:
            return self._claims.expire(now_s, self._bit)

    def registered(self, worker_id: str, kv_epoch: int) -> bool:
        """The registry lists `worker_id` with `kv_epoch` (its process's first KV epoch; 0:
        unknown). If that is newer than the epoch of its last applied event, the worker
        restarted: drop its entries, claims and gaps, and wait for its events from seq 1 of
        `kv_epoch` (events of older epochs, still in the stream, are ignored from now on).
        True if entries were dropped or the position moved. Called on every refresh."""
        with self._lock:
            position = self._events.register(worker_id, kv_epoch)
            if position is Position.RESTARTED:
                self._drop_entries(worker_id)
            return position is not Position.STALE

    def forget(self, worker_id: str) -> None:
        """Drop everything about a worker that left the registry (entries, epoch, slot)."""
        with self._lock:
            self._drop_entries(worker_id)
            self._events.forget(worker_id)
            bit = self._bit.pop(worker_id, None)
            if bit is not None:
                del self._owner[bit]
                self._free_slots.append(bit.bit_length() - 1)

    # --- readers -----------------------------------------------------------------------------

    def match(self, block_hashes: Sequence[int], worker_ids: Iterable[str]) -> dict[str, int]:
        """For each of `worker_ids`: how many of the prompt's leading blocks it holds.

        A worker's count is the larger of its confirmed leading run and its longest live claim
        on a prefix of the prompt (a confirmed run that resumes after a claim's end is not
        added to it: an underestimate, for at most one TTL).

        Cost O(num_blocks + num_workers), with the per-block work in C: one pass over the
        hashes that looks up each block's holder bitmask and groups equal consecutive masks
        (itertools.groupby), so Python-level work happens once per RUN of equal masks (a
        long shared prefix is one run), and the walk stops as soon as no candidate matches
        (a prompt nobody holds costs one lookup). The runs it walks are recorded (up to
        RECORD_BUDGET_BLOCKS blocks per call), and a later prompt that holds one pays one
        lookup for it instead of one per block: a 32k-token prompt whose prefix was matched
        before, with no event on it since, costs O(runs + num_workers). Then, if there are
        live claims, one pass that intersects the claims with the prompt, and a Python step
        per claim that ends inside it. Does not expire claims; call `expire` first.
        """
        result = dict.fromkeys(worker_ids, 0)
        with self._lock:
            bits = self._bit
            candidates = 0
            for worker_id in result:
                candidates |= bits.get(worker_id, 0)
            if not candidates or not block_hashes:
                return result
            owner = self._owner
            # still = candidates holding all of blocks 0..position-1 (confirmed). Within a run
            # of equal masks, AND-ing again changes nothing, so one AND per run is exact.
            still, position, num_blocks = candidates, 0, len(block_hashes)
            run_at = self._runs.by_start.get  # `RunTable.find`, inlined: one step per run
            budget = RECORD_BUDGET_BLOCKS
            while still and position < num_blocks:
                run = run_at(block_hashes[position])
                if run is not None:
                    length, end, mask = run
                    last = position + length - 1
                    if last >= num_blocks or block_hashes[last] != end:
                        run = None  # the prompt ends or diverges inside the run
                if run is None:
                    position, still, budget = self._scan(block_hashes, position, still, result, budget)
                    continue
                narrowed = still & mask  # a recorded run: one AND for all of its blocks
                if narrowed != still:
                    _assign(result, owner, still ^ narrowed, position)  # their run ends here
                    still = narrowed
                position += length
            _assign(result, owner, still, position)  # held every block (still is 0 after a break)
            for num_claimed, claimants in self._claims.ends(block_hashes):  # chains ending inside
                claimed = claimants & candidates
                while claimed:
                    low = claimed & -claimed
                    if result[owner[low]] < num_claimed:
                        result[owner[low]] = num_claimed
                    claimed ^= low
        return result

    def worker_ids(self) -> frozenset[str]:
        """Every worker the index has entries or an event position for."""
        with self._lock:
            return frozenset(self._bit) | self._events.worker_ids()

    def num_blocks(self, worker_id: str) -> int:
        """Confirmed block hashes of the worker."""
        with self._lock:
            return len(self._confirmed.get(worker_id, ()))

    def num_claims(self, worker_id: str) -> int:
        """Live speculative claims of the worker (chains and anchors routed to it, neither
        confirmed nor expired yet)."""
        with self._lock:
            return self._claims.count(worker_id)

    def num_gaps(self, worker_id: str) -> int:
        """Seq gaps seen for the worker since its current view began (0: view complete)."""
        with self._lock:
            return self._events.num_gaps(worker_id)

    def blocks(self, worker_id: str) -> frozenset[int]:
        """The worker's confirmed block hashes."""
        with self._lock:
            return frozenset(self._confirmed.get(worker_id, ()))

    def gapped_workers(self) -> tuple[str, ...]:
        """The workers whose current view has a seq gap, sorted."""
        with self._lock:
            return self._events.gapped_workers()

    def mode(self) -> RoutingMode:
        """`load_only` when no worker has a confirmed entry (what routing does then, whatever
        the gaps), else `degraded` when some worker's view has a seq gap, else `exact`."""
        with self._lock:
            if not self._holders:
                return RoutingMode.LOAD_ONLY
            return RoutingMode.DEGRADED if self._events.any_gaps() else RoutingMode.EXACT

    # --- internals (lock held) ---------------------------------------------------------------

    def _scan(
        self, block_hashes: Sequence[int], position: int, still: int, result: dict[str, int], budget: int
    ) -> tuple[int, int, int]:
        """`match`'s block-by-block walk from `position`: group equal masks, assign the
        candidates whose run ends, record runs while `budget` (blocks) lasts. Returns
        (position, still, budget left) when no candidate is left, at the end of the prompt,
        or where a recorded run starts."""
        owner, runs = self._owner, self._runs
        num_blocks = len(block_hashes)
        for mask, run in groupby(map(self._holders.get, islice(block_hashes, position, None), repeat(0))):
            narrowed = still & mask
            if narrowed != still:
                _assign(result, owner, still ^ narrowed, position)  # their run ends here
                still = narrowed
                if not still:
                    break
            length = len(list(run))
            if budget > 0:  # the first `budget` blocks of a longer run are a run too
                runs.record(block_hashes, position, min(length, budget), mask)
                budget -= length + RECORD_COST_BLOCKS
            position += length
            if position < num_blocks and runs.starts_at(block_hashes[position]):
                break
        return position, still, budget

    def _bit_for(self, worker_id: str) -> int:
        bit = self._bit.get(worker_id)
        if bit is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._owner)
            bit = self._bit[worker_id] = 1 << slot
            self._owner[bit] = worker_id
        return bit

    def _drop_entries(self, worker_id: str) -> None:
        """Remove all of the worker's confirmed entries and claims (keeps its slot)."""
        confirmed = self._confirmed.pop(worker_id, set())
        bit = self._bit.get(worker_id)
        if bit is None:
            return
        self._runs.invalidate(confirmed)
        for h in confirmed:
            _clear_bit(self._holders, h, bit)
        self._claims.drop(worker_id, bit)


def _assign(result: dict[str, int], owner: dict[int, str], mask: int, num_blocks: int) -> None:
    """Set `result[w] = num_blocks` for every worker `w` whose bit is in `mask`."""
    while mask:
        low = mask & -mask
        result[owner[low]] = num_blocks
        mask ^= low


def _clear_bit(masks: dict[int, int], h: int, bit: int) -> None:
    mask = masks.get(h, 0) & ~bit
    if mask:
        masks[h] = mask
    else:
        masks.pop(h, None)
