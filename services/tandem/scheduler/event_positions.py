"""Where each worker's KV event stream stands in the prefix index: the (epoch, seq) of the last
event applied, and the seq gaps seen since the worker's current view began (index.py's layout,
third item).

Owner: one `PrefixIndex`, which calls it with its lock held; nothing else touches it. It
decides, per event or registration, whether the index applies it and whether the worker
restarted (a newer epoch), in which case the index drops the worker's entries and claims. It
never touches the entries itself. Its log records are the index's (logger
`tandem.scheduler.index`), as they were before this module was split out of it.
"""

from __future__ import annotations

import enum
import logging

from tandem.common.workers import KVEventRecord

logger = logging.getLogger("tandem.scheduler.index")


class Position(enum.Enum):
    STALE = "stale"  # an old or duplicate event, or a registration with nothing new: ignore it
    CURRENT = "current"  # apply it (a gap, if any, is counted)
    RESTARTED = "restarted"  # a newer epoch: drop the worker's entries and claims, then apply it


class EventPositions:
    def __init__(self) -> None:
        self._positions: dict[str, tuple[int, int]] = {}  # worker -> (epoch, last seq)
        self._gaps: dict[str, int] = {}

    def advance(self, record: KVEventRecord) -> Position:
        """Check (epoch, seq) against the last applied event and move past it (unless STALE)."""
        worker_id, epoch, seq = record.worker_id, record.epoch, record.seq
        position = self._positions.get(worker_id)
        verdict = Position.CURRENT
        if position is None:
            if seq != 1:  # the stream was trimmed, or the worker was forgotten meanwhile
                logger.info("kv events of %s start at seq %d of epoch %d; its view is partial", worker_id, seq, epoch)
                self._gaps[worker_id] = self._gaps.get(worker_id, 0) + 1
        elif epoch < position[0] or (epoch == position[0] and seq <= position[1]):
            logger.debug("ignoring stale kv event %s epoch %d seq %d", worker_id, epoch, seq)
            return Position.STALE
        elif epoch > position[0]:
            logger.info(
                "worker %s restarted (epoch %d -> %d); dropping its index entries", worker_id, position[0], epoch
            )
            verdict = Position.RESTARTED
            self._gaps.pop(worker_id, None)
            if seq != 1:
                self._gaps[worker_id] = 1
        elif seq != position[1] + 1:
            logger.warning(
                "kv events of %s: gap in epoch %d (seq %d after %d); keeping its entries",
                worker_id,
                epoch,
                seq,
                position[1],
            )
            self._gaps[worker_id] = self._gaps.get(worker_id, 0) + 1
        self._positions[worker_id] = (epoch, seq)
        return verdict

    def register(self, worker_id: str, kv_epoch: int) -> Position:
        """The registry lists `worker_id` with `kv_epoch` (0: unknown); see
        `PrefixIndex.registered`. STALE: nothing changes; CURRENT: a first position (seq 0 of
        `kv_epoch`); RESTARTED: a newer epoch than the last applied event's (gaps cleared)."""
        position = self._positions.get(worker_id)
        if kv_epoch == 0 or (position is not None and position[0] >= kv_epoch):
            return Position.STALE
        verdict = Position.CURRENT
        if position is not None:
            logger.info(
                "worker %s registered again under epoch %d (index at epoch %d); dropping its index entries",
                worker_id,
                kv_epoch,
                position[0],
            )
            verdict = Position.RESTARTED
            self._gaps.pop(worker_id, None)
        self._positions[worker_id] = (kv_epoch, 0)
        return verdict

    def clear_gaps(self, worker_id: str) -> None:
        """The worker's view is complete again (a CLEARED event)."""
        self._gaps.pop(worker_id, None)

    def forget(self, worker_id: str) -> None:
        self._positions.pop(worker_id, None)
        self._gaps.pop(worker_id, None)

    def worker_ids(self) -> frozenset[str]:
        return frozenset(self._positions)

    def num_gaps(self, worker_id: str) -> int:
        return self._gaps.get(worker_id, 0)

    def gapped_workers(self) -> tuple[str, ...]:
        return tuple(sorted(w for w, n in self._gaps.items() if n))

    def any_gaps(self) -> bool:
        return any(self._gaps.values())
