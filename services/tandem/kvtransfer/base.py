"""The KV hand-off interface (DESIGN.md sections 2 and 4): one small Protocol, two backends.

Lifecycle of one hand-off, and who calls what:
1. The prefill worker P builds one transport with `create_transport(config.transport, config)`
   and calls `add_source(server, store, leases)` once, before its grpc.aio server starts.
   When a prompt finishes, P grants a lease (services/tandem/kvtransfer/leases.py) and returns a
   `KVHandle`, converted at the gRPC edge with `handle_to_proto`.
2. The decode worker D converts the handle back with `handle_from_proto`, reserves its own
   blocks, and awaits `transport.pull(handle, src_block_ids, dst_block_ids, store, timeout_s)`
   in its asyncio loop. `src_block_ids[i]` of P lands in `dst_block_ids[i]` of D. On success
   the destination blocks hold the source's bytes exactly; on `KVTransferError` they were not
   written (every check runs before the unpack), and D recomputes the prompt locally.
3. Either way D then awaits `transport.release(handle, timeout_s)` so that P frees the blocks
   before the lease expires. D owns its destination blocks throughout; P owns its source
   blocks until release or expiry.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, TypeVar

from tandem.common.layout import KVLayout
from tandem.common.pb import tandem_pb2 as pb
from tandem.kvtransfer.config import KVTransferConfig

if TYPE_CHECKING:
    import grpc

    from tandem.kvtransfer.block_store import KVBlockStore
    from tandem.kvtransfer.leases import LeaseTable

MAX_HANDLE_BLOCKS = 1 << 20  # a handle naming more blocks than this is malformed
T = TypeVar("T")


class FailureReason(enum.Enum):
    PEER_UNAVAILABLE = "peer_unavailable"  # source unreachable, gone, or its pair broke
    CHECKSUM = "checksum"  # bytes arrived but differ from what the source packed
    TIMEOUT = "timeout"  # the pull did not finish within its bound
    LAYOUT_MISMATCH = "layout_mismatch"  # the two workers' KV layouts differ
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

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class KVHandleInfo:
    """What a prefill worker returns so that a decode worker can pull the prompt's KV."""

    request_id: str
    source_worker_id: str
    source_address: str  # host:port of the source's gRPC server
    block_ids: tuple[int, ...]  # source block ids in block-table order
    num_tokens: int  # positions with valid KV (the prompt)
    layout: str  # KVLayout.describe() of the source
    block_hashes: tuple[int, ...]  # hashes of the full blocks
    lease_deadline_unix_s: float


def handle_to_proto(handle: KVHandleInfo) -> pb.KVHandle:
    """P's gRPC edge: the handle that goes into a PrefillResponse."""
    return pb.KVHandle(
        request_id=handle.request_id,
        source_worker_id=handle.source_worker_id,
        source_address=handle.source_address,
        block_ids=handle.block_ids,
        num_tokens=handle.num_tokens,
        layout=handle.layout,
        block_hashes=handle.block_hashes,
        lease_deadline_unix_s=handle.lease_deadline_unix_s,
    )


def handle_from_proto(msg: pb.KVHandle) -> KVHandleInfo:
    """D's gRPC edge: check what a peer sent before anything uses it (ValueError names it)."""
    if not msg.request_id or not msg.source_address:
        raise ValueError("KV handle needs a request_id and a source_address")
    if len(msg.block_ids) > MAX_HANDLE_BLOCKS or len(msg.block_hashes) > len(msg.block_ids):
        raise ValueError(f"KV handle names {len(msg.block_ids)} blocks and {len(msg.block_hashes)} block hashes")
    if len(set(msg.block_ids)) != len(msg.block_ids):
        raise ValueError("KV handle repeats a block id")
    return KVHandleInfo(
        request_id=msg.request_id,
        source_worker_id=msg.source_worker_id,
        source_address=msg.source_address,
        block_ids=tuple(msg.block_ids),
        num_tokens=msg.num_tokens,
        layout=msg.layout,
        block_hashes=tuple(msg.block_hashes),
        lease_deadline_unix_s=msg.lease_deadline_unix_s,
    )


def check_pull(
    handle: KVHandleInfo, src_block_ids: tuple[int, ...], dst_block_ids: tuple[int, ...], store: KVBlockStore
) -> None:
    """Receiver-side checks every transport runs before touching the network.

    A layout that differs from ours is a `KVTransferError(LAYOUT_MISMATCH)` naming the fields
    ("ours" is the receiver). Arguments that contradict the handle or the store are caller bugs:
    ValueError.
    """
    try:
        theirs = KVLayout.parse(handle.layout)
    except ValueError as exc:
        raise KVTransferError(FailureReason.LAYOUT_MISMATCH, f"source layout: {exc}") from None
    mismatch = store.layout.mismatch(theirs)
    if mismatch is not None:
        raise KVTransferError(FailureReason.LAYOUT_MISMATCH, mismatch)
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks")
    outside = set(src_block_ids) - set(handle.block_ids)
    if outside:
        raise ValueError(f"source block ids {sorted(outside)[:8]} are not in the handle of {handle.request_id!r}")
    store.check_block_ids(dst_block_ids)


async def run_to_completion(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` in a thread and wait for it to end even if the caller is cancelled
    meanwhile (the cancellation is re-raised afterwards). For copies into blocks that the
    caller frees as soon as it sees the cancellation: they must not be written after that."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                continue
        raise


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
        handle: KVHandleInfo,
        src_block_ids: tuple[int, ...],
        dst_block_ids: tuple[int, ...],
        store: KVBlockStore,
        timeout_s: float,
    ) -> TransferStats:
        """Copy source blocks `src_block_ids` into `dst_block_ids` of `store`, or raise
        KVTransferError with the destination untouched. Does not release the lease."""
        ...

    async def release(self, handle: KVHandleInfo, timeout_s: float) -> bool:
        """Ask the source to free the lease now (ReleaseKV). False if it was already gone;
        never raises for an unreachable source (the lease then expires)."""
        ...

    def add_source(self, server: grpc.aio.Server, store: KVBlockStore, leases: LeaseTable) -> None:
        """Register the source servicer on P's server; call once, before `server.start()`."""
        ...

    async def close(self) -> None:
        """Close channels and pairs. The transport is unusable afterwards."""
        ...


_TRANSPORTS = MappingProxyType(
    {  # name -> (module, class), imported on first use
        "grpc": ("tandem.kvtransfer.grpc_transport", "GrpcTransport"),
        "torch": ("tandem.kvtransfer.torch_transport", "TorchTransport"),
    }
)
TRANSPORT_NAMES: tuple[str, ...] = tuple(sorted(_TRANSPORTS))  # `--kv-transport` choices


def create_transport(name: str, config: KVTransferConfig | None = None) -> KVTransport:
    """Build the transport registered as `name` (the worker's `kv_transfer.transport`)."""
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; choose one of {sorted(_TRANSPORTS)}")
    module, cls = _TRANSPORTS[name]
    transport: KVTransport = getattr(importlib.import_module(module), cls)(config or KVTransferConfig(transport=name))
    return transport
