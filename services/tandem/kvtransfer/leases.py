"""Leases: how long a prefill worker keeps a finished prompt's blocks pinned for a pull.

Lifecycle of one lease (DESIGN.md section 4, "Ownership"):
1. The step loop finishes a prompt (`engine.held[request_id]`); the prefill server calls
   `grant(request_id, held, ttl_s)` and puts the returned deadline and secret in the KV handle.
2. Each pull (a gRPC thread or task) reads the blocks inside `with checkout(request_id,
   block_ids, secret, block_hashes):`. The checkout validates the request against the lease
   and pins it.
3. The lease ends once: `release` (ReleaseKV from a holder of the handle: the decode worker,
   or the gateway that will not use it), `revoke` (the source itself: a cancelled Prefill, the
   request owner's Abort, a drain) or `expire` (a step-loop tick, past the deadline). If a pull
   holds it pinned, freeing waits until the last pin goes, so blocks are never freed while
   they are read.
4. `on_free(request_id)` is then called exactly once, outside the table's lock, on whichever
   thread ended it; the prefill server submits `engine.release_held` to its step loop there.

Who may touch a lease: only a holder of its KV handle. Request ids are chosen by callers and
easy to guess, so each lease also has a secret, `LEASE_SECRET_BYTES` random bytes drawn by
`grant` and carried only in the handle; `checkout`, `check` and `release` compare it in constant
time. A wrong secret is answered exactly as an unknown request id (the same message, nothing
read, nothing released), so a caller without the handle learns nothing, not even whether the
request exists; only a holder is told that its lease was released or expired.

What a pull may take: the blocks the receiver asks for must be full blocks of the lease, and
the receiver says which hashes it expects them to have (its handle's, which it checked against
its own prompt). The lease keeps the hashes the engine recorded for its full blocks
(`HeldKV.block_hashes`) and refuses any difference with `BlockHashMismatch`: a holder of one
lease's handle cannot have its blocks filed under another prompt's hashes (cache poisoning).

Per-block checksums (block_digests.py): once a source transport attached a `LeaseDigests`
(`digests_for`), each lease granted from then on has its full blocks hashed once, in the
digests' thread, and its digests are dropped when the lease is freed.

Thread-safe: every method may be called from any thread.
"""

from __future__ import annotations

import enum
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from tandem.common.kv_handle import LEASE_SECRET_BYTES
from tandem.engine.outputs import HeldKV
from tandem.kvtransfer.block_digests import LeaseDigests
from tandem.kvtransfer.block_store import KVBlockStore

log = logging.getLogger(__name__)

# How BlockHashMismatch's message starts: the source sends it with FAILED_PRECONDITION, and the
# receiver tells it from a layout mismatch by it (channels.rpc_error).
HASH_MISMATCH_PREFIX = "block hashes differ from the lease's"
MAX_REMEMBERED_ENDS = 4096  # ended leases remembered, to tell "expired" from "unknown"


class LeaseError(Exception):
    """A pull was refused; the message names the request id, the block id or the deadline."""


class BlockHashMismatch(LeaseError):
    """The receiver expects other block hashes than the lease's (or asks for a block without
    one: a partial last block). Only a holder of the secret gets this far."""


class LeaseState(enum.Enum):
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True)
class LeaseGrant:
    """What the prefill server puts in the KV handle: the deadline and the secret."""

    deadline_unix_s: float
    secret: bytes = field(repr=False)


@dataclass
class _Lease:
    held: HeldKV
    deadline_unix_s: float
    blocks: frozenset[int]
    secret: bytes = field(repr=False)
    hashes: dict[int, int]  # full block id -> its hash, as the engine recorded it
    state: LeaseState = LeaseState.ACTIVE
    num_pins: int = 0  # pulls reading the blocks right now


@dataclass(frozen=True)
class LeaseCounters:
    granted: int
    released: int
    expired: int
    active: int  # granted and not yet freed (includes ended leases still pinned by a pull)


class LeaseTable:
    def __init__(self, on_free: Callable[[str], None], clock: Callable[[], float] = time.time) -> None:
        """`on_free(request_id)`: called once per lease when its blocks may be freed. `clock`:
        unix seconds (deadlines travel to other hosts, so they are wall-clock times)."""
        self._on_free = on_free
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._ended: OrderedDict[str, tuple[LeaseState, bytes]] = OrderedDict()  # -> (how, secret)
        self._granted = 0
        self._released = 0
        self._expired = 0
        self._digests: LeaseDigests | None = None

    def digests_for(self, store: KVBlockStore) -> LeaseDigests:
        """The per-block digests of the leases on `store` (a CPU cache), made on the first call
        (a source transport's `add_source`); leases granted from then on are hashed at grant."""
        with self._lock:
            if self._digests is None or self._digests.store is not store:
                self._digests = LeaseDigests(store)
            return self._digests

    def grant(self, request_id: str, held: HeldKV, ttl_s: float) -> LeaseGrant:
        """Pin `held` for `ttl_s` seconds; return the deadline (unix seconds) and a new secret."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        secret = secrets.token_bytes(LEASE_SECRET_BYTES)
        with self._lock:
            if request_id in self._leases:
                raise LeaseError(f"request {request_id!r} already has a lease")
            deadline = self._clock() + ttl_s
            hashes = dict(zip(held.block_ids, held.block_hashes))  # the first len(block_hashes) blocks
            self._leases[request_id] = _Lease(held, deadline, frozenset(held.block_ids), secret, hashes)
            self._ended.pop(request_id, None)
            self._granted += 1
            if self._digests is not None:  # the blocks are written and now pinned: hash them once
                self._digests.submit(request_id, held.block_ids[: len(held.block_hashes)])  # (queued only)
            return LeaseGrant(deadline, secret)

    @contextmanager
    def checkout(
        self, request_id: str, block_ids: Sequence[int], secret: bytes, block_hashes: Sequence[int]
    ) -> Iterator[HeldKV]:
        """Validate a pull of `block_ids`, whose hashes the receiver expects to be
        `block_hashes`, and pin the lease for the `with` body.

        Raises LeaseError if the lease is unknown or `secret` is not its secret, if it ended or
        is past its deadline, or if the ids are empty, repeated, more than the lease holds, or
        not all in the lease; BlockHashMismatch (a LeaseError) if `block_hashes` are not the
        lease's hashes of those blocks.
        """
        with self._lock:
            lease = self._validate(request_id, block_ids, secret, block_hashes)
            lease.num_pins += 1
        try:
            yield lease.held
        finally:
            with self._lock:
                lease.num_pins -= 1
                free = lease.num_pins == 0 and lease.state is not LeaseState.ACTIVE
                if free:
                    del self._leases[request_id]
            if free:
                self._free(request_id)

    def check(self, request_id: str, block_ids: Sequence[int], secret: bytes, block_hashes: Sequence[int]) -> None:
        """The validation of `checkout` without pinning: lets a pull refuse a peer before it
        allocates anything. The checkout itself validates again."""
        with self._lock:
            self._validate(request_id, block_ids, secret, block_hashes)

    def release(self, request_id: str, secret: bytes) -> bool:
        """End the lease now for a holder of its handle (ReleaseKV). False, with no effect, if
        it is unknown, already ended, or `secret` is not its secret."""
        return self._end_now(request_id, secret)

    def revoke(self, request_id: str) -> bool:
        """End the lease now on the source's own authority (a cancelled Prefill, the request
        owner's Abort, a drain), without its secret. False if it is unknown or already ended."""
        return self._end_now(request_id, None)

    def _end_now(self, request_id: str, secret: bytes | None) -> bool:
        """`release` (with the secret to compare) or `revoke` (None)."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None or lease.state is not LeaseState.ACTIVE:
                return False
            if secret is not None and not hmac.compare_digest(lease.secret, secret):
                return False
            lease.state = LeaseState.RELEASED
            self._released += 1
            free = self._end(request_id, lease)
        if free:
            self._free(request_id)
        return True

    def expire(self, now_s: float) -> list[str]:
        """End every active lease whose deadline is <= `now_s` (unix seconds); return their ids.
        Called from the prefill step loop's tick."""
        freed: list[str] = []
        expired: list[str] = []
        with self._lock:
            for request_id, lease in list(self._leases.items()):
                if lease.state is LeaseState.ACTIVE and lease.deadline_unix_s <= now_s:
                    lease.state = LeaseState.EXPIRED
                    self._expired += 1
                    expired.append(request_id)
                    if self._end(request_id, lease):
                        freed.append(request_id)
        for request_id in freed:
            self._free(request_id)
        return expired

    def release_all(self) -> list[str]:
        """Scale-down drain: release every active lease; return their ids."""
        with self._lock:
            ids = [r for r, lease in self._leases.items() if lease.state is LeaseState.ACTIVE]
        return [r for r in ids if self.revoke(r)]

    def deadline(self, request_id: str) -> float | None:
        with self._lock:
            lease = self._leases.get(request_id)
            return lease.deadline_unix_s if lease is not None and lease.state is LeaseState.ACTIVE else None

    @property
    def counters(self) -> LeaseCounters:
        with self._lock:
            return LeaseCounters(self._granted, self._released, self._expired, len(self._leases))

    def __len__(self) -> int:
        """Leases whose blocks are still pinned (active, or ended but being read)."""
        with self._lock:
            return len(self._leases)

    # ---- under the lock ------------------------------------------------------------------
    def _validate(
        self, request_id: str, block_ids: Sequence[int], secret: bytes, block_hashes: Sequence[int]
    ) -> _Lease:
        lease = self._leases.get(request_id)
        ended = (lease.state, lease.secret) if lease is not None else self._ended.get(request_id)
        if ended is None or not hmac.compare_digest(ended[1], secret):
            raise LeaseError(f"no lease for request {request_id!r} (unknown request id, or not its secret)")
        if lease is None or lease.state is not LeaseState.ACTIVE:
            raise LeaseError(f"the lease for request {request_id!r} was {ended[0].value}")
        now = self._clock()
        if lease.deadline_unix_s <= now:
            raise LeaseError(f"the lease for request {request_id!r} expired {now - lease.deadline_unix_s:.3f} s ago")
        if not block_ids:
            raise LeaseError(f"no block ids requested for request {request_id!r}")
        if len(block_ids) > len(lease.blocks):
            raise LeaseError(
                f"{len(block_ids)} block ids requested but the lease for {request_id!r} holds {len(lease.blocks)}"
            )
        if len(set(block_ids)) != len(block_ids):
            raise LeaseError(f"block ids for request {request_id!r} repeat an id")
        outside = next((b for b in block_ids if b not in lease.blocks), None)
        if outside is not None:
            raise LeaseError(f"block id {outside} is not in the lease for request {request_id!r}")
        _check_hashes(request_id, lease.hashes, block_ids, block_hashes)
        return lease

    def _end(self, request_id: str, lease: _Lease) -> bool:
        """Record the end; drop the lease and return True if no pull pins it (free it now)."""
        self._ended[request_id] = (lease.state, lease.secret)
        while len(self._ended) > MAX_REMEMBERED_ENDS:
            self._ended.popitem(last=False)
        if lease.num_pins:
            return False
        del self._leases[request_id]
        return True

    # ---- outside the lock ----------------------------------------------------------------
    def _free(self, request_id: str) -> None:
        if self._digests is not None:
            self._digests.drop(request_id)
        try:
            self._on_free(request_id)
        except Exception:  # the lease is gone either way; the caller's loop must survive
            log.exception("on_free(%r) failed", request_id)


def _check_hashes(request_id: str, hashes: dict[int, int], block_ids: Sequence[int], expected: Sequence[int]) -> None:
    """Raise BlockHashMismatch unless `expected[i]` is the lease's hash of `block_ids[i]`."""
    if len(expected) != len(block_ids):
        raise BlockHashMismatch(
            f"{HASH_MISMATCH_PREFIX} for request {request_id!r}: {len(expected)} hashes for {len(block_ids)} block ids"
        )
    for block_id, want in zip(block_ids, expected):
        have = hashes.get(block_id)
        if have is None:
            raise BlockHashMismatch(
                f"{HASH_MISMATCH_PREFIX} for request {request_id!r}: "
                f"block {block_id} is not a full block (it has no hash)"
            )
        if have != want:
            raise BlockHashMismatch(
                f"{HASH_MISMATCH_PREFIX} for request {request_id!r}: "
                f"block {block_id} has hash {have:#018x}, the receiver expects {want:#018x}"
            )
