"""The same-host KV transport: the source packs the blocks into a shared-memory segment, the
receiver maps it and copies them into its reserved blocks (segments: shm_segments.py).

Lifecycle of one pull (decode worker D, prefill worker P, same host id):
1. D checks its arguments (`check_pull`) and calls `P.PullKVShm` with the PullKV fields plus
   its host id and pid, under the pull's deadline.
2. P (`ShmKVServicer.PullKVShm`) refuses what PullKV refuses, with the same codes (layout:
   FAILED_PRECONDITION; malformed: INVALID_ARGUMENT; lease, secret, block ids: NOT_FOUND; block
   hashes: FAILED_PRECONDITION "block hashes differ ..."), and another host id
   (PERMISSION_DENIED). Holding the lease checked out, it packs the blocks into a new
   segment in a thread, computes its xxh64, and answers name, size and checksum. It tracks the
   segment until the receiver took it, the lease ended or the receiver died (its janitor).
3. D opens and unlinks the segment, checks its size and xxh64 against the answer, and only
   then unpacks into the destination blocks: on any failure they are untouched. D then calls
   ReleaseKV as for every transport.
`same_host.SameHostTransport` decides when to use this and falls back to the network.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc
import torch
import xxhash

from tandem.common import kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.kvtransfer.base import FailureReason, KVTransferError, TransferStats, check_pull, run_to_completion
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVICE, ChannelCache
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import lease_status
from tandem.kvtransfer.leases import LeaseError, LeaseTable
from tandem.kvtransfer.shm_segments import (
    SegmentName,
    map_segment,
    pid_alive,
    sweep_dead,
    unlink_quietly,
    write_segment,
)

log = logging.getLogger(__name__)

JANITOR_PERIOD_S = 0.5  # how often the source frees segments nobody will take


def checksum(view: torch.Tensor) -> int:
    """xxh64 of a CPU uint8 tensor's bytes."""
    return xxhash.xxh64_intdigest(view.numpy().data)


class ShmKVServicer:
    """Source side: the PullKVShm method of the KVTransfer service, on P's grpc.aio server.
    Owns the segments it created until a receiver unlinks them (module doc of shm_segments)."""

    def __init__(self, store: KVBlockStore, leases: LeaseTable, config: KVTransferConfig, host_id: str) -> None:
        self.store, self.leases, self.config, self.host_id = store, leases, config, host_id
        self._segments: dict[str, tuple[str, int]] = {}  # name -> (request id, receiver pid); asyncio thread
        self._janitor: asyncio.Task[None] | None = None
        self.num_pulls_served = 0
        sweep_dead(config.shm_dir)

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.PullKVShm,
            request_deserializer=kv_codec.pull_kv_request_from_bytes,
            response_serializer=kv_codec.shm_segment_to_bytes,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"PullKVShm": handler}),))

    def pack_into(self, block_ids: tuple[int, ...], view: torch.Tensor) -> int:
        """Worker thread, lease checked out: pack into the segment and return its xxh64.
        Tests override it to corrupt the segment after the checksum."""
        self.store.pack(block_ids, out=view)
        return checksum(view)

    async def PullKVShm(
        self, request: kv_codec.PullKVRequest, context: grpc.aio.ServicerContext
    ) -> kv_codec.ShmSegment:
        await self._admit(request, context)
        self._start_janitor()
        block_ids = request.block_ids
        size_bytes = len(block_ids) * self.store.bytes_per_block
        name = SegmentName.new(request.receiver_pid)
        try:
            with self.leases.checkout(request.request_id, block_ids, request.lease_secret, request.block_hashes):
                sum64 = await run_to_completion(
                    write_segment, self.config.shm_dir, name, size_bytes, lambda v: self.pack_into(block_ids, v)
                )
        except LeaseError as exc:
            await context.abort(lease_status(exc), str(exc))
        except BaseException:  # cancelled (the receiver went away) or failed: nobody takes it
            unlink_quietly(self.config.shm_dir, name)
            raise
        self._segments[name] = (request.request_id, request.receiver_pid)
        self.num_pulls_served += 1
        return kv_codec.ShmSegment(name, size_bytes, sum64)

    async def _admit(self, request: kv_codec.PullKVRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            theirs = KVLayout.parse(request.layout)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"receiver layout: {exc}")
        mismatch = self.store.layout.mismatch(theirs)
        if mismatch is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
        if request.host_id != self.host_id:  # REFUSED at the receiver: it falls back to the network
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"receiver host id {request.host_id[:64]!r} is not this host's ({self.host_id!r})",
            )
        if not 0 < request.receiver_pid < 2**22 or not 0 < len(request.block_ids) <= self.config.max_blocks_per_pull:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"receiver pid {request.receiver_pid} with {len(request.block_ids)} block ids; a pull moves "
                f"1..{self.config.max_blocks_per_pull}",
            )

    def collect(self) -> list[str]:
        """Unlink the tracked segments nobody will take (lease ended, receiver dead); forget
        those a receiver took. Returns the names unlinked."""
        unlinked = []
        for name, (request_id, receiver_pid) in list(self._segments.items()):
            if not os.path.exists(os.path.join(self.config.shm_dir, name)):
                del self._segments[name]  # the receiver took it
            elif self.leases.deadline(request_id) is None or not pid_alive(receiver_pid):
                unlink_quietly(self.config.shm_dir, name)
                del self._segments[name]
                unlinked.append(name)
        return unlinked

    def _start_janitor(self) -> None:
        if self._janitor is None or self._janitor.done():
            self._janitor = asyncio.get_running_loop().create_task(self._run_janitor())

    async def _run_janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_PERIOD_S)
            try:
                self.collect()
            except OSError as exc:  # the janitor must survive a directory that went away
                log.warning("KV segment janitor: %s", exc)

    def close(self) -> None:
        """Stop the janitor and unlink every segment still tracked."""
        if self._janitor is not None:
            self._janitor.cancel()
        for name in self._segments:
            unlink_quietly(self.config.shm_dir, name)
        self._segments.clear()


class ShmTransport:
    """Receiver side; one per decode worker, used from its asyncio loop (via SameHostTransport)."""

    name = "shm"

    def __init__(self, config: KVTransferConfig, host_id: str) -> None:
        self.config, self.host_id = config, host_id
        self.channels = ChannelCache(token=config.token)
        sweep_dead(config.shm_dir)

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
        started = time.perf_counter()
        address = handle.source_address
        call = self.channels.unary(
            address, "PullKVShm", kv_codec.pull_kv_request_to_bytes, kv_codec.shm_segment_from_bytes
        )
        request = kv_codec.PullKVRequest(
            handle.request_id, src, store.layout.describe(), 0, handle.lease_secret, hashes, self.host_id, os.getpid()
        )
        try:
            segment = await call(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            error = await self.channels.fail(exc, address)
            if error.reason is FailureReason.PEER_UNAVAILABLE:
                await asyncio.to_thread(sweep_dead, self.config.shm_dir)  # a segment of a dead source
            raise error from None
        size_bytes = len(src) * store.bytes_per_block
        if segment.size_bytes != size_bytes:
            raise KVTransferError(
                FailureReason.PROTOCOL, f"{address}: segment of {segment.size_bytes} bytes, expected {size_bytes}"
            )
        await run_to_completion(self._copy, segment, store, dst, address)
        return TransferStats(size_bytes, time.perf_counter() - started, len(src), 1, transport=self.name)

    def _copy(self, segment: kv_codec.ShmSegment, store: KVBlockStore, dst: tuple[int, ...], address: str) -> None:
        """Worker thread: map, verify, then unpack (the destination is untouched on failure)."""
        try:
            with map_segment(self.config.shm_dir, segment.name, segment.size_bytes) as view:
                got = checksum(view)
                if got != segment.checksum:
                    raise KVTransferError(
                        FailureReason.CHECKSUM,
                        f"{address}: segment {segment.name} has xxh64 {got:#018x}, the source sent "
                        f"{segment.checksum:#018x}",
                    )
                store.unpack(view, dst)
        except ValueError as exc:
            raise KVTransferError(FailureReason.PROTOCOL, f"{address}: {exc}") from None
        except OSError as exc:
            raise KVTransferError(
                FailureReason.PEER_UNAVAILABLE, f"{address}: cannot open KV segment {segment.name[:120]}: {exc}"
            ) from None

    async def close(self) -> None:
        await self.channels.close()
