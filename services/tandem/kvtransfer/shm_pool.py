"""Reuse of same-host KV segments (shm_segments.py): the receiver's pool of its own segments,
and the source's mappings of the segments receivers lend it.

Receiver (`SegmentPool`, one per decode worker): `acquire(size)` hands out an idle segment of
at least that size (the smallest that fits), or creates one; `give_back` after a good pull
keeps it for the next, `discard` after a failed one unlinks it. Idle segments are unlinked
after `idle_s` (at the next acquire, give_back or `trim`) or while the pool holds more than
`max_bytes`. `close` unlinks everything.

Source (`LentSegments`, one per prefill worker): `checkout(name, ...)` maps a receiver's segment
(or reuses the mapping from its last pull) for one pull, `checkin` ends that pull; `collect`
(the janitor) unmaps segments whose file is gone, and unlinks those of dead receivers.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from tandem.kvtransfer.shm_segments import Segment, SegmentName, check_name, pid_alive, unlink_quietly

SEGMENT_ALIGN_BYTES = 1 << 21  # sizes rounded up to 2 MiB: a slightly larger pull reuses a segment
POOL_MAX_BYTES = 1 << 30  # idle segments a receiver keeps at most
POOL_IDLE_S = 30.0  # an idle segment unused this long is unlinked
MAX_LENT_MAPPINGS = 64  # receivers' segments a source keeps mapped at most


class SegmentPool:
    """The receiver's segments. Thread-safe: pulls start in the asyncio loop, copies end in
    worker threads."""

    def __init__(self, directory: str, max_bytes: int = POOL_MAX_BYTES, idle_s: float = POOL_IDLE_S) -> None:
        self.directory, self.max_bytes, self.idle_s = directory, max_bytes, idle_s
        self._lock = threading.Lock()
        self._idle: list[tuple[Segment, float]] = []  # (segment, monotonic time it became idle)
        self._busy: dict[str, Segment] = {}
        self.num_created = 0

    def acquire(self, size_bytes: int) -> Segment:
        """An idle segment of at least `size_bytes`, or a new one (OSError if it cannot be made)."""
        with self._lock:
            self._trim(time.monotonic())
            fits = [i for i, (seg, _) in enumerate(self._idle) if seg.size_bytes >= size_bytes]
            if fits:
                best = min(fits, key=lambda i: self._idle[i][0].size_bytes)
                segment = self._idle.pop(best)[0]
                self._busy[segment.name] = segment
                return segment
        size = -(-size_bytes // SEGMENT_ALIGN_BYTES) * SEGMENT_ALIGN_BYTES
        segment = Segment.create(self.directory, size)  # outside the lock: allocating takes a while
        with self._lock:
            self.num_created += 1
            self._busy[segment.name] = segment
        return segment

    def give_back(self, segment: Segment) -> None:
        """After a pull that ended well: keep it for the next one."""
        with self._lock:
            if self._busy.pop(segment.name, None) is None:  # closed meanwhile
                segment.close()
                return
            self._idle.append((segment, time.monotonic()))
            self._trim(time.monotonic())

    def discard(self, segment: Segment) -> None:
        """After a failed or cancelled pull: a source may still write into it, never reuse it."""
        with self._lock:
            self._busy.pop(segment.name, None)
        segment.unlink()
        segment.close()

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted([seg.name for seg, _ in self._idle] + list(self._busy))

    def close(self) -> None:
        """Unlink every segment; the busy ones are unmapped when their pull gives them back."""
        with self._lock:
            idle, self._idle = self._idle, []
            busy, self._busy = list(self._busy.values()), {}
        for segment, _ in idle:
            segment.unlink()
            segment.close()
        for segment in busy:
            segment.unlink()

    def trim(self) -> None:
        """Unlink idle segments unused for `idle_s` (the receiver's timer calls it)."""
        with self._lock:
            self._trim(time.monotonic())

    def _trim(self, now: float) -> None:
        """Lock held: unlink idle segments too old, then the oldest beyond `max_bytes`."""
        keep: list[tuple[Segment, float]] = []
        total = 0
        for segment, since in reversed(self._idle):  # newest first
            if now - since > self.idle_s or total + segment.size_bytes > self.max_bytes:
                segment.unlink()
                segment.close()
            else:
                keep.append((segment, since))
                total += segment.size_bytes
        self._idle = keep[::-1]


class LentSegments:
    """The source's mappings of receivers' segments, by name, least recently used first. Used
    from the asyncio thread only (the copies into a checked-out segment run in threads).

    A mapping in use by a pull is never unmapped under it (a torch view does not pin an mmap:
    a write after the unmap would fault): one that must go meanwhile (its file replaced,
    `close`) is retired and unmapped when its last pull checks it in."""

    def __init__(self, directory: str, max_mappings: int = MAX_LENT_MAPPINGS) -> None:
        self.directory, self.max_mappings = directory, max_mappings
        self._mapped: OrderedDict[str, Segment] = OrderedDict()
        self._users: dict[Segment, int] = {}  # segment -> pulls writing into it now
        self._retired: set[Segment] = set()  # out of `_mapped`, unmapped at their last checkin

    def checkout(self, name: str, receiver_pid: int, min_bytes: int, max_bytes: int) -> Segment:
        """The receiver's segment `name`, mapped (Segment.open's checks and errors)."""
        check_name(name, receiver_pid)  # also for a mapping kept from an earlier pull
        segment = self._mapped.pop(name, None)
        if segment is not None and (not segment.still_there() or not min_bytes <= segment.size_bytes <= max_bytes):
            self._drop(segment)
            segment = None
        if segment is None:
            segment = Segment.open(self.directory, name, receiver_pid, min_bytes, max_bytes)
        self._mapped[name] = segment
        self._users[segment] = self._users.get(segment, 0) + 1
        while len(self._mapped) > self.max_mappings:
            oldest = next((n for n, seg in self._mapped.items() if seg not in self._users), None)
            if oldest is None:
                break
            self._drop(self._mapped.pop(oldest))
        return segment

    def checkin(self, segment: Segment) -> None:
        """The pull that checked it out ended (it writes no more)."""
        left = self._users.pop(segment, 1) - 1
        if left:
            self._users[segment] = left
        elif segment in self._retired:
            self._retired.discard(segment)
            segment.close()

    def collect(self) -> list[str]:
        """Unmap the segments not in use whose file is gone or whose receiver is dead, and
        unlink the latter. Returns the names unlinked."""
        unlinked = []
        for name, segment in list(self._mapped.items()):
            if segment in self._users:
                continue
            parts = SegmentName.parse(name)
            dead = parts is not None and not pid_alive(parts.receiver_pid)
            if dead and segment.still_there() and unlink_quietly(self.directory, name):
                unlinked.append(name)
            if dead or not segment.still_there():
                self._drop(self._mapped.pop(name))
        return unlinked

    @property
    def names(self) -> list[str]:
        return list(self._mapped)

    def close(self) -> None:
        """Unmap everything (the receivers own the files); what pulls still write into, when
        they check it in."""
        for segment in self._mapped.values():
            self._drop(segment)
        self._mapped.clear()

    def _drop(self, segment: Segment) -> None:
        if segment in self._users:
            self._retired.add(segment)
        else:
            segment.close()
