"""The KV hand-off interface (DESIGN.md sections 2 and 4): one small Protocol, two backends.

Lifecycle of one hand-off, and who calls what:
1. The prefill worker P builds one transport with `create_transport(config.transport, config)`
   and calls `add_source(server, store, leases)` once, before its grpc.aio server starts.
   When a prompt finishes, P grants a lease (services/tandem/kvtransfer/leases.py) and returns a
   `KVHandle` (services/tandem/common/kv_handle.py; the codec carries it over gRPC).
2. The decode worker D checks the handle against its own layout once (`KVHandle.check`),
   reserves its own blocks, and awaits `transport.pull(handle, src_block_ids, dst_block_ids, store, timeout_s)`
   in its asyncio loop. `src_block_ids[i]` of P lands in `dst_block_ids[i]` of D. On success
   the destination blocks hold the source's bytes exactly; on `KVTransferError` their bytes
   are undefined (the gRPC transport leaves them untouched; the torch transport may have
   received into some of them, and writes nothing after the pull ends), so D gives them back
   uncached (`Engine.unreserve`) and recomputes the prompt locally.
3. Either way D then awaits `transport.release(handle, timeout_s)` so that P frees the blocks
   before the lease expires, unless the pull's `TransferStats.released` says the pull
   released the lease already (a decode worker's verified same-host one-copy pull,
   shm_pool_source.py). D owns its destination blocks throughout; P owns its source blocks
   until release or expiry.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, TypeVar

from tandem.common.kv_handle import KVHandle
from tandem.kvtransfer.config import TRANSPORTS, KVTransferConfig

if TYPE_CHECKING:
    import grpc

    from tandem.kvtransfer.block_store import KVBlockStore
    from tandem.kvtransfer.leases import LeaseTable

T = TypeVar("T")


class FailureReason(enum.Enum):
    PEER_UNAVAILABLE = "peer_unavailable"  # source unreachable, gone, or its pair broke
    CHECKSUM = "checksum"  # bytes arrived but differ from what the source packed
    TIMEOUT = "timeout"  # the pull did not finish within its bound
    LAYOUT_MISMATCH = "layout_mismatch"  # the two workers' KV layouts differ
    HASH_MISMATCH = "hash_mismatch"  # the source's blocks do not have the hashes the handle claims
    REFUSED = "refused"  # the source said no: unknown/expired lease, block id outside it, busy
    PROTOCOL = "protocol"  # malformed or inconsistent messages


class KVTransferError(Exception):
    """A pull failed; the destination blocks were not written. `reason` is for metrics and
    fallbacks, the message for people (it names the field, block id or peer at fault)."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.args[0]}"


@dataclass(frozen=True)
class TransferStats:
    """What one pull moved. `seconds` is wall time from the first request to the unpack's end."""

    bytes_moved: int
    seconds: float
    num_blocks: int
    num_chunks: int
    transport: str = ""  # the transport that moved the bytes ("shm", "grpc", ...); "": not said
    shm_fallback: str = ""  # the FailureReason value of a same-host attempt that fell back; "": none
    released: bool = False  # the pull released the lease at the source: no `release` call follows

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 1e6 if self.seconds > 0 else 0.0


def check_pull(
    handle: KVHandle, src_block_ids: tuple[int, ...], dst_block_ids: tuple[int, ...], store: KVBlockStore
) -> tuple[int, ...]:
    """Receiver-side checks of a pull's arguments, which every transport runs before touching
    the network. Arguments that contradict the handle or the store are caller bugs: ValueError.
    Returns the handle's hashes of `src_block_ids`, which the pull request carries: the source
    sends nothing unless its lease holds exactly those hashes for those blocks (so the blocks
    are the ones whose hashes the caller checked against its prompt). Only full blocks have
    one, so only full blocks can be pulled.

    The layouts are compared once on each side of a transfer: by the receiver's caller before
    it reserves blocks (`KVHandle.check`, the decode worker), and by the source against the
    layout the pull request names (`KVTransferServicer.admit`). A transport never sends a
    pull with a layout other than its store's, so a mismatch the caller missed is still refused.
    """
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks")
    outside = set(src_block_ids) - set(handle.block_ids)
    if outside:
        raise ValueError(f"source block ids {sorted(outside)[:8]} are not in the handle of {handle.request_id!r}")
    store.check_block_ids(dst_block_ids)
    hash_of = dict(zip(handle.block_ids, handle.block_hashes))  # the handle's full blocks
    partial = [b for b in src_block_ids if b not in hash_of]
    if partial:
        raise ValueError(f"source block ids {partial[:8]} of {handle.request_id!r} are not full blocks (no hash)")
    return tuple(hash_of[b] for b in src_block_ids)


async def run_to_completion(fn: Callable[..., T], *args: object, on_cancel: Callable[[], None] | None = None) -> T:
    """Run `fn(*args)` in a thread and wait for it to end even if the caller is cancelled
    meanwhile (the cancellation is re-raised afterwards). For copies into blocks that the
    caller frees as soon as it sees the cancellation: they must not be written after that.
    `on_cancel` (called once, on the caller's thread, at the cancellation) makes `fn` end
    early, e.g. by shutting down the socket it reads."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                continue
        raise


class CheckedPull:
    """The start every transport's `pull` shares: the ids as tuples, `check_pull`, and an
    empty pull answered at once. A transport defines `name` and `_pull`, which moves a
    non-empty, checked pull (`hashes`: the handle's block hashes, as `check_pull` returns)."""

    name: str

    async def pull(
        self,
        handle: KVHandle,
        src_block_ids: tuple[int, ...],
        dst_block_ids: tuple[int, ...],
        store: KVBlockStore,
        timeout_s: float,
    ) -> TransferStats:
        src, dst = tuple(src_block_ids), tuple(dst_block_ids)
        hashes = check_pull(handle, src, dst, store)
        if not src:
            return TransferStats(0, 0.0, 0, 0, transport=self.name)
        return await self._pull(handle, src, dst, hashes, store, timeout_s)

    async def _pull(
        self,
        handle: KVHandle,
        src: tuple[int, ...],
        dst: tuple[int, ...],
        hashes: tuple[int, ...],
        store: KVBlockStore,
        timeout_s: float,
    ) -> TransferStats:
        raise NotImplementedError


class KVTransport(Protocol):
    """One KV hand-off backend, chosen by name in config (`create_transport`).

    Receiver side (decode worker, its asyncio loop): `pull`, `release`, `close`. Long copies
    and checksums run in threads; the loop is never blocked for more than a chunk's worth.
    Source side (prefill worker): `add_source` registers the KVTransfer servicer that serves
    pulls from `store`, under the leases in `leases`.
    """

    name: str

    async def pull(
        self,
        handle: KVHandle,
        src_block_ids: tuple[int, ...],
        dst_block_ids: tuple[int, ...],
        store: KVBlockStore,
        timeout_s: float,
    ) -> TransferStats:
        """Copy source blocks `src_block_ids` into `dst_block_ids` of `store`, or raise
        KVTransferError with no block outside `dst_block_ids` written (those are undefined,
        see step 2 above). Does not release the lease, unless the stats say `released` (a
        failed pull never does)."""
        ...

    async def release(self, handle: KVHandle, timeout_s: float) -> bool:
        """Ask the source to free the lease now (ReleaseKV). False if it was already gone;
        never raises for an unreachable source (the lease then expires)."""
        ...

    def add_source(self, server: grpc.aio.Server, store: KVBlockStore, leases: LeaseTable) -> None:
        """Register the source servicer on P's server; call once, before `server.start()`."""
        ...

    async def close(self) -> None:
        """Close channels and pairs. The transport is unusable afterwards."""
        ...


_TRANSPORTS = MappingProxyType(TRANSPORTS)


def create_transport(name: str, config: KVTransferConfig | None = None) -> KVTransport:
    """Build the transport registered as `name` (the worker's `kv_transfer.transport`)."""
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; choose one of {sorted(_TRANSPORTS)}")
    module, cls = _TRANSPORTS[name]
    transport: KVTransport = getattr(importlib.import_module(module), cls)(config or KVTransferConfig(transport=name))
    return transport
