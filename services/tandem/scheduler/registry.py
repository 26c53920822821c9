"""The scheduler's view of the worker registry: which workers it may route to, split by pool.

`Scheduler.refresh_now` reads the live workers from Redis, keeps those whose block hashes it
can use (`RegistrationCheck`), and swaps in a new `RegistrySnapshot`. A worker whose block
size, model id or block-hash version differs from the gateway's would make every prefix
lookup miss (its KV events name hashes the gateway never computes), so it is never routed to,
and the reason is logged once per worker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tandem.common.block_hash import BLOCK_HASH_VERSION
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler.types import WorkerView

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HashScheme:
    """What block hashes depend on (DESIGN.md section 4, "Block hashing"). `model_id=None`
    accepts any model id (a scheduler used without a gateway, as in benchmarks)."""

    block_size: int
    model_id: str | None
    block_hash_version: int = BLOCK_HASH_VERSION

    def mismatch(self, info: WorkerInfo) -> str | None:
        """None if `info`'s hashes are ours, else a message naming every differing value."""
        ours = {"block_size": self.block_size, "model_id": self.model_id, "block_hash_version": self.block_hash_version}
        diffs = [
            f"{name} (ours {value!r}, theirs {getattr(info, name)!r})"
            for name, value in ours.items()
            if value is not None and getattr(info, name) != value
        ]
        return ", ".join(diffs) or None


class RegistrationCheck:
    """Filters the registry by `HashScheme`; logs each refused worker once (again only if it
    leaves the registry and comes back refused). Used by the refresher thread only."""

    def __init__(self, scheme: HashScheme) -> None:
        self.scheme = scheme
        self._refused: dict[str, str] = {}  # worker id -> why, for workers refused and still listed

    def accept(self, workers: Iterable[WorkerInfo]) -> list[WorkerInfo]:
        accepted, refused = [], {}
        for info in workers:
            why = self.scheme.mismatch(info)
            if why is None:
                accepted.append(info)
                continue
            refused[info.worker_id] = why
            if self._refused.get(info.worker_id) != why:
                logger.warning("not routing to worker %s: its block hashes differ: %s", info.worker_id, why)
        self._refused = refused
        return accepted

    @property
    def refused(self) -> Mapping[str, str]:
        """Workers refused at the last `accept`, with why."""
        return dict(self._refused)


@dataclass(frozen=True)
class RegistrySnapshot:
    """The live workers and their last loads at `taken_at_s`, split by pool, sorted by id.

    The views carry `num_cached_blocks=0`: `route_on` replaces only the views of workers that
    hold part of the prompt, so a route builds few new objects.
    """

    prefill: tuple[WorkerView, ...]
    decode: tuple[WorkerView, ...]
    prefill_ids: tuple[str, ...]  # ids of `prefill`, in order
    decode_ids: tuple[str, ...]
    worker_ids: tuple[str, ...]  # all, sorted
    taken_at_s: float

    @classmethod
    def of(
        cls, workers: Iterable[WorkerInfo], loads: Mapping[str, WorkerLoad | None], taken_at_s: float
    ) -> RegistrySnapshot:
        views = sorted(
            (WorkerView(w, loads.get(w.worker_id), 0) for w in workers), key=lambda view: view.info.worker_id
        )
        prefill = tuple(v for v in views if v.info.role is WorkerRole.PREFILL)
        decode = tuple(v for v in views if v.info.role is WorkerRole.DECODE)
        return cls(
            prefill=prefill,
            decode=decode,
            prefill_ids=tuple(v.info.worker_id for v in prefill),
            decode_ids=tuple(v.info.worker_id for v in decode),
            worker_ids=tuple(v.info.worker_id for v in views),
            taken_at_s=taken_at_s,
        )


EMPTY_SNAPSHOT = RegistrySnapshot((), (), (), (), (), 0.0)
