"""The workers as the rest of the cluster sees them: role, registration, load, KV events.

Frozen, validated records (DESIGN.md section 4, "Redis keys"): a worker publishes its
`WorkerInfo` when it registers and its `WorkerLoad` on every heartbeat; its block pool's
changes become `KVEventRecord`s. `tandem.common.cluster_state` stores them in Redis; the
scheduler, the autoscaler and the launcher read them. This module imports nothing else from
the project (the leaf layer).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from tandem.common.block_hash import BLOCK_HASH_VERSION

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")  # cluster names and worker ids: no glob chars
_HEX_RE = re.compile(r"^[0-9a-f]{1,128}$")
_UINT64_MAX = 2**64 - 1


# What a draining worker's UNAVAILABLE details say (gRPC status details are the only channel):
# "worker {id} is draining: ...". Gateways resume such a stream on another worker instead of
# failing it (gateway/migration.py); workers build the text with `draining_details`.
DRAINING_DETAILS = "is draining"


def draining_details(worker_id: str, reason: str = "") -> str:
    """The details of a draining worker's UNAVAILABLE, with an optional reason after a colon."""
    return f"worker {worker_id} {DRAINING_DETAILS}" + (f": {reason}" if reason else "")


class WorkerRole(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class KVEventKind(str, enum.Enum):
    STORED = "stored"  # blocks became cached (full and hashed) on the worker
    REMOVED = "removed"  # blocks were evicted
    CLEARED = "cleared"  # the worker dropped its whole cache; carries no hashes


def check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{what} must be 1-128 chars of [A-Za-z0-9_.-], got {value!r}")


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker publishes when it registers; fixed for the worker's lifetime.

    `block_size`, `model_id` and `block_hash_version` are what its block hashes depend on: a
    gateway routes only to workers whose three values equal its own (a mismatch would make
    every prefix lookup miss). The defaults are `EngineConfig`'s block size, no model id,
    and this code's hash version. `reference_hash` is the worker's own
    `block_hash.reference_block_hash(model_id, block_size)`, computed by its code: a gateway
    refuses a worker whose value differs from its own (the hash function differs even if the
    declared values agree), or that publishes none (None: a worker older than the check).
    `kv_epoch` is the epoch of the worker process's first KV events (0: not published): a
    worker restarted under the same id registers a larger one, and gateways drop the index
    entries of its previous life at once, before it publishes any event."""

    worker_id: str
    role: WorkerRole
    address: str  # host:port of its gRPC server
    fingerprint: str  # layout fingerprint, lowercase hex
    capacity_blocks: int
    version: str
    block_size: int = 16
    model_id: str = ""  # the `model_id` of its block hashes (`block_hash.block_extra`)
    block_hash_version: int = BLOCK_HASH_VERSION
    reference_hash: int | None = None
    kv_epoch: int = 0
    kv_cache_dtype: str = ""  # `--kv-cache-dtype` (auto, fp8, ...); "": not published (an older worker)
    host_id: str = ""  # `tandem.common.host_id`: equal ids may share memory; "": not published (an older worker)

    def __post_init__(self) -> None:
        check_name("worker_id", self.worker_id)
        if not isinstance(self.role, WorkerRole):
            raise ValueError(f"role must be a WorkerRole, got {self.role!r}")
        if not self.address or not isinstance(self.address, str):
            raise ValueError("address must be a non-empty string")
        if not isinstance(self.fingerprint, str) or not _HEX_RE.match(self.fingerprint):
            raise ValueError(f"fingerprint must be lowercase hex, got {self.fingerprint!r}")
        _check_non_negative(capacity_blocks=self.capacity_blocks, block_hash_version=self.block_hash_version)
        if not isinstance(self.version, str):
            raise ValueError("version must be a string")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        if not isinstance(self.model_id, str) or len(self.model_id) > 256:
            raise ValueError(f"model_id must be a string of at most 256 characters, got {self.model_id!r}")
        ref = self.reference_hash
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref <= _UINT64_MAX):
            raise ValueError(f"reference_hash must be None or an unsigned 64-bit int, got {ref!r}")
        _check_non_negative(kv_epoch=self.kv_epoch)
        if not isinstance(self.host_id, str) or len(self.host_id) > 128:
            raise ValueError(f"host_id must be a string of at most 128 characters, got {self.host_id!r}")


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load at `timestamp_s` (wall clock, seconds since the epoch)."""

    waiting: int
    running: int
    queued_prefill_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    timestamp_s: float
    # Speculative decoding since the worker started (0 without it): draft tokens proposed and
    # accepted by the target; `tandem status` shows their ratio as the acceptance rate.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    def __post_init__(self) -> None:
        _check_non_negative(
            waiting=self.waiting,
            running=self.running,
            queued_prefill_tokens=self.queued_prefill_tokens,
            kv_blocks_used=self.kv_blocks_used,
            kv_blocks_total=self.kv_blocks_total,
            spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
        )
        if self.spec_accepted_tokens > self.spec_draft_tokens:
            raise ValueError("spec_accepted_tokens must be <= spec_draft_tokens")
        if self.kv_blocks_used > self.kv_blocks_total:
            raise ValueError("kv_blocks_used must be <= kv_blocks_total")
        if not isinstance(self.timestamp_s, (int, float)) or not math.isfinite(self.timestamp_s):
            raise ValueError(f"timestamp_s must be a finite number, got {self.timestamp_s!r}")

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use, in [0, 1] (0 for an empty pool)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens, in [0, 1]; None before any draft."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None


@dataclass(frozen=True)
class KVEventRecord:
    """One KV cache event of one worker. `(epoch, seq)` orders a worker's events: seq starts at
    1 in each epoch and has no gaps, so a reader that sees a gap (trimmed stream, lost write)
    knows its view of that worker is incomplete."""

    worker_id: str
    epoch: int
    seq: int
    kind: KVEventKind
    block_hashes: tuple[int, ...]

    def __post_init__(self) -> None:
        check_name("worker_id", self.worker_id)
        _check_non_negative(epoch=self.epoch, seq=self.seq)
        if not isinstance(self.kind, KVEventKind):
            raise ValueError(f"kind must be a KVEventKind, got {self.kind!r}")
        if any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h <= _UINT64_MAX for h in self.block_hashes):
            raise ValueError("block hashes must be unsigned 64-bit ints")
        if (self.kind is KVEventKind.CLEARED) != (not self.block_hashes):
            raise ValueError("a cleared event has no hashes; stored/removed need at least one")
