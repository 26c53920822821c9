"""The scheduler's view of the worker registry: which workers it may route to, split by pool.

`Scheduler.refresh_now` reads the live workers from Redis, keeps those whose block hashes it
can use (`RegistrationCheck`), and swaps in a new `RegistrySnapshot`. A worker whose block
size, model id or block-hash version differs from the gateway's would make every prefix
lookup miss (its KV events name hashes the gateway never computes), so it is never routed to,
and the reason is logged once per worker. The declared values are not enough: a worker whose
hash function differs (another code version that forgot to bump the hash version) declares
the same ones. So each worker also publishes the hash of a fixed reference token vector
(`block_hash.reference_block_hash`), computed by its own code, and the gateway refuses it
unless that equals its own value (hash parity); a worker that publishes none is refused too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from tandem.common.block_hash import BLOCK_HASH_VERSION, reference_block_hash
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler.types import WorkerView

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HashScheme:
    """What block hashes depend on (DESIGN.md section 4, "Block hashing"). `model_id=None`
    accepts any model id (a scheduler used without a gateway, as in benchmarks), and then
    skips the reference hash, which depends on the model id."""

    block_size: int
    model_id: str | None
    block_hash_version: int = BLOCK_HASH_VERSION

    @cached_property
    def reference_hash(self) -> int | None:
        """Our `reference_block_hash`; None without a model id."""
        return None if self.model_id is None else reference_block_hash(self.model_id, self.block_size)

    def mismatch(self, info: WorkerInfo) -> str | None:
        """None if `info`'s hashes are ours, else a message naming every differing value,
        then the reference hash (which also differs when only the hash function does)."""
        ours = {"block_size": self.block_size, "model_id": self.model_id, "block_hash_version": self.block_hash_version}
        diffs = [
            f"{name} (ours {value!r}, theirs {getattr(info, name)!r})"
            for name, value in ours.items()
            if value is not None and getattr(info, name) != value
        ]
        ours_ref, theirs_ref = self.reference_hash, info.reference_hash
        if ours_ref is not None and theirs_ref is None:
            diffs.append("no reference block hash published (a worker older than the hash parity check)")
        elif ours_ref is not None and theirs_ref is not None and theirs_ref != ours_ref:
            cause = "" if diffs else ": the hash function differs"
            diffs.append(f"reference block hash (ours 0x{ours_ref:016x}, theirs 0x{theirs_ref:016x}){cause}")
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


class Liveness:
    """When each worker was last confirmed in Redis, and the registry's outages: what decides
    which workers a snapshot keeps when Redis cannot say (DESIGN.md section 5: stale workers
    are never picked). Used by the refresher thread only; times are the scheduler's clock.

    - While the registry cannot be read, the last snapshot stays, minus the workers last
      confirmed more than `stale_grace_s` ago (`fresh`).
    - For `recovery_window_s` after it can be read again, a worker missing from it that was
      confirmed within `stale_grace_s` is kept (`keep_missing`): a freeze longer than the
      workers' TTL expired every key, and a restarted Redis is empty, until the workers
      register again (within a fraction of a second).
    - Otherwise a worker missing from the registry is gone at once (expired or drained).
    """

    def __init__(self, stale_grace_s: float, recovery_window_s: float) -> None:
        self._grace_s, self._window_s = stale_grace_s, recovery_window_s
        self._seen_s: dict[str, float] = {}
        self._outage_since_s: float | None = None
        self._recovered_at_s: float | None = None

    @property
    def in_outage(self) -> bool:
        return self._outage_since_s is not None

    def read(self, worker_ids: Iterable[str], now_s: float) -> None:
        """The registry was read at `now_s` and listed `worker_ids`."""
        for worker_id in worker_ids:
            self._seen_s[worker_id] = now_s
        if self._outage_since_s is not None:
            self._outage_since_s = None
            self._recovered_at_s = now_s

    def failed(self, now_s: float) -> None:
        """The registry could not be read at `now_s`."""
        if self._outage_since_s is None:
            self._outage_since_s = now_s

    def fresh(self, worker_id: str, now_s: float) -> bool:
        """Confirmed within `stale_grace_s` of `now_s`."""
        seen_s = self._seen_s.get(worker_id)
        return seen_s is not None and now_s - seen_s <= self._grace_s

    def keep_missing(self, worker_id: str, now_s: float) -> bool:
        """A worker missing from a read at `now_s` stays: in the recovery window, and fresh."""
        recovered = self._recovered_at_s is not None and now_s - self._recovered_at_s <= self._window_s
        return recovered and self.fresh(worker_id, now_s)

    def after_read(
        self,
        previous: RegistrySnapshot,
        workers: Iterable[WorkerInfo],
        loads: Mapping[str, WorkerLoad | None],
        now_s: float,
    ) -> RegistrySnapshot:
        """The snapshot of a read at `now_s` (`workers`, with `loads` keyed by every listed
        id), plus the workers of `previous` missing from it that `keep_missing` keeps, with
        their last loads."""
        kept = [
            v
            for v in previous.prefill + previous.decode
            if v.info.worker_id not in loads and self.keep_missing(v.info.worker_id, now_s)
        ]
        all_loads = {**loads, **{v.info.worker_id: v.load for v in kept}}
        return RegistrySnapshot.of([*workers, *(v.info for v in kept)], all_loads, now_s)

    def without_stale(self, snapshot: RegistrySnapshot, now_s: float) -> tuple[RegistrySnapshot, list[str]]:
        """`snapshot` without the workers that are not `fresh` at `now_s`, and their ids."""
        views = snapshot.prefill + snapshot.decode
        fresh = [v for v in views if self.fresh(v.info.worker_id, now_s)]
        if len(fresh) == len(views):
            return snapshot, []
        stale = sorted(set(snapshot.worker_ids) - {v.info.worker_id for v in fresh})
        loads = {v.info.worker_id: v.load for v in fresh}
        return RegistrySnapshot.of([v.info for v in fresh], loads, snapshot.taken_at_s), stale

    def retain(self, worker_ids: Iterable[str]) -> None:
        """Forget the workers not in `worker_ids` (those that left the snapshot)."""
        keep = set(worker_ids)
        self._seen_s = {w: t for w, t in self._seen_s.items() if w in keep}
