"""The gRPC KV transport: the source streams checksummed chunks of the packed buffer.

Lifecycle of one pull (decode worker D pulls from prefill worker P):
1. D checks its arguments (`check_pull`; its caller checked the handle's layout) and opens `PullKV` on its
   cached channel to P, with the pull's deadline.
2. P (`KVTransferServicer.PullKV`) refuses a layout that differs from its own
   (FAILED_PRECONDITION, naming the fields) and a malformed request (INVALID_ARGUMENT), and
   checks the lease out with the secret and the block hashes the request carries from the
   handle (NOT_FOUND, naming the problem, if the lease refuses; a wrong secret reads as an
   unknown request id; FAILED_PRECONDITION "block hashes differ ..." if the lease's blocks do
   not have the hashes the receiver expects, nothing read). It streams
   chunks of `max_chunk_bytes` (clamped to 1..4 MiB), each with its
   offset, the total, dtype, shape and the xxh64 of its data. Chunks are encoded in a thread,
   one ahead of the network, straight from the cache when the blocks are one run (else packed
   plane by plane into staging: `PackedReader`); the lease stays checked out until the last
   one is encoded.
3. D checks each chunk's header against what it asked for (contiguous offsets, total, dtype,
   shape) as it arrives, and its checksum in a thread while the next one arrives, copying it
   into a staging buffer (`grpc_receive`). Only when every byte has arrived and matched does D
   unpack into the destination blocks (the last chunk is checked and copied by the unpack's
   thread): a failed pull leaves them untouched. D then calls ReleaseKV (`release`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import torch

from tandem.common import kv_codec
from tandem.common.kv_codec import ChunkView, encode_chunk
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.kvtransfer.base import (
    CheckedPull,
    FailureReason,
    KVTransferError,
    TransferStats,
    run_to_completion,
)
from tandem.kvtransfer.block_store import KVBlockStore, PackedReader
from tandem.kvtransfer.channels import SERVICE, ChannelCache, release_remote
from tandem.kvtransfer.config import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, KVTransferConfig
from tandem.kvtransfer.grpc_receive import ExpectedChunks, land, settle, settle_later, verify_and_copy
from tandem.kvtransfer.leases import BlockHashMismatch, LeaseError, LeaseTable
from tandem.kvtransfer.staging import StagingPool


def lease_status(exc: LeaseError) -> grpc.StatusCode:
    """A refused checkout's status: FAILED_PRECONDITION when the blocks are not the ones the
    receiver expects (other hashes: the receiver recomputes and counts `hash_mismatch`),
    NOT_FOUND for every other refusal (unknown, ended or foreign lease, block ids outside it)."""
    return grpc.StatusCode.FAILED_PRECONDITION if isinstance(exc, BlockHashMismatch) else grpc.StatusCode.NOT_FOUND


def clamp_chunk_bytes(requested: int) -> int:
    """The source's chunk size for a request: 0 means the largest, else clamped to 1..4 MiB."""
    return MAX_CHUNK_BYTES if requested == 0 else min(max(requested, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)


class KVTransferServicer:
    """Source side of the KVTransfer service, on the prefill worker's grpc.aio server.

    Reads `store` (the engine's cache) from worker threads, only for blocks checked out of
    `leases`; ReleaseKV ends a lease (the lease table then calls its on_free).
    """

    def __init__(self, store: KVBlockStore, leases: LeaseTable, config: KVTransferConfig) -> None:
        self.store = store
        self.leases = leases
        self.config = config
        self.staging = StagingPool(config.max_staging_bytes, pin_memory=store.device.type == "cuda")
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="kv-encode")
        self.num_pulls_served = 0
        self.bytes_served = 0

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The codec translates every message; PullKV yields chunks it already encoded
        (`kv_codec.encode_chunk`), hence no serializer."""
        return {
            "PullKV": grpc.unary_stream_rpc_method_handler(
                self.PullKV, request_deserializer=kv_codec.pull_kv_request_from_bytes, response_serializer=None
            ),
            "ReleaseKV": grpc.unary_unary_rpc_method_handler(
                self.ReleaseKV,
                request_deserializer=kv_codec.release_kv_request_from_bytes,
                response_serializer=kv_codec.release_kv_response_to_bytes,
            ),
        }

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service to `server` (before it starts); methods not served: UNIMPLEMENTED."""
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, self.handlers()),))

    async def admit(self, context: grpc.aio.ServicerContext, layout_text: str, block_ids: tuple[int, ...]) -> None:
        """Checks shared by every pull RPC, before any lease or buffer is touched."""
        refusal = self.admission(layout_text, block_ids)
        if refusal is not None:
            await context.abort(*refusal)

    def admission(self, layout_text: str, block_ids: tuple[int, ...]) -> tuple[grpc.StatusCode, str] | None:
        """`admit`'s refusal (status and message), or None; also for pulls that come without a
        call (the tcp transport's in-band requests)."""
        try:
            theirs = KVLayout.parse(layout_text)
        except ValueError as exc:
            return grpc.StatusCode.FAILED_PRECONDITION, f"receiver layout: {exc}"
        mismatch = self.store.layout.mismatch(theirs)
        if mismatch is not None:
            return grpc.StatusCode.FAILED_PRECONDITION, mismatch
        if not 0 < len(block_ids) <= self.config.max_blocks_per_pull:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(block_ids)} block ids requested; a pull moves 1..{self.config.max_blocks_per_pull}",
            )
        return None

    def encode_chunk(self, reader: PackedReader, offset_bytes: int, size_bytes: int) -> bytes:
        """One wire chunk (worker thread, lease checked out). Tests override it to corrupt one."""
        shape = self.store.packed_shape(len(reader.block_ids))
        return encode_chunk(
            reader.read(offset_bytes, size_bytes), offset_bytes, reader.total_bytes, self.store.layout.kv_dtype, shape
        )

    async def PullKV(self, request: kv_codec.PullKVRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        block_ids = request.block_ids
        await self.admit(context, request.layout, block_ids)
        total = len(block_ids) * self.store.bytes_per_block
        chunk_bytes = clamp_chunk_bytes(request.max_chunk_bytes)
        with contextlib.ExitStack() as stack:
            try:  # pinned until the last chunk is encoded: chunks are read from the cache
                stack.enter_context(
                    self.leases.checkout(request.request_id, block_ids, request.lease_secret, request.block_hashes)
                )
            except LeaseError as exc:
                await context.abort(lease_status(exc), str(exc))
            staging = None
            if PackedReader.needs_staging(self.store, block_ids):
                staging = self.staging.acquire(total)
                stack.callback(self.staging.give_back, staging)
            reader = PackedReader(self.store, block_ids, staging)

            def encode(offset: int) -> Future[bytes]:
                return self._executor.submit(self.encode_chunk, reader, offset, min(chunk_bytes, total - offset))

            pending = encode(0)  # encoding runs one chunk ahead of the network
            try:
                for offset in range(0, total, chunk_bytes):
                    encoded = await asyncio.wrap_future(pending)
                    if offset + chunk_bytes < total:
                        pending = encode(offset + chunk_bytes)
                    yield encoded
                self.num_pulls_served += 1
                self.bytes_served += total
            finally:
                if not pending.cancel() and not pending.done():
                    # An encoding thread still reads the cache and the staging buffer: the
                    # lease stays checked out (and the buffer lent) until it ends.
                    pending.add_done_callback(functools.partial(_close_stack, stack.pop_all()))

    async def ReleaseKV(self, request: kv_codec.ReleaseKVRequest, context: grpc.aio.ServicerContext) -> bool:
        """False, with no effect, for an unknown or ended lease or a secret that is not its own."""
        return self.leases.release(request.request_id, request.lease_secret)

    def close(self) -> None:
        """After the server stopped: end the encoding threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class GrpcTransport(CheckedPull):
    """Receiver side of the gRPC transport; one per decode worker, used from its asyncio loop.
    Owns its channel cache and staging buffers."""

    name = "grpc"

    def __init__(self, config: KVTransferConfig) -> None:
        self.config = config
        self.channels = ChannelCache(token=config.token)
        self.staging = StagingPool(config.max_staging_bytes)
        self._servicers: list[KVTransferServicer] = []

    def add_source(self, server: grpc.aio.Server, store: KVBlockStore, leases: LeaseTable) -> None:
        servicer = KVTransferServicer(store, leases, self.config)
        servicer.register(server)
        self._servicers.append(servicer)

    async def _pull(
        self,
        handle: KVHandle,
        src: tuple[int, ...],
        dst: tuple[int, ...],
        hashes: tuple[int, ...],
        store: KVBlockStore,
        timeout_s: float,
    ) -> TransferStats:
        started = time.perf_counter()
        buffer = self.staging.acquire(len(src) * store.bytes_per_block)
        try:
            num_chunks, last = await self._receive(handle, src, hashes, store, buffer, timeout_s)
            # Every byte arrived and all but the last chunk matched: one thread checks and copies
            # that one, and only if it matched touches the destination blocks.
            await run_to_completion(land, last, buffer, store, dst, handle.source_address)
        except asyncio.CancelledError:
            self.staging.forget(buffer)  # a copy thread may still be writing it
            raise
        except BaseException:
            self.staging.give_back(buffer)
            raise
        self.staging.give_back(buffer)
        return TransferStats(len(buffer), time.perf_counter() - started, len(src), num_chunks)

    async def _receive(
        self,
        handle: KVHandle,
        src: tuple[int, ...],
        hashes: tuple[int, ...],
        store: KVBlockStore,
        buffer: torch.Tensor,
        timeout_s: float,
    ) -> tuple[int, ChunkView]:
        """Stream the chunks into `buffer`, each checked against what was asked for as it
        arrives, and each but the last checked (xxh64) and copied in a thread while the next one
        arrives; return the number of chunks and the last one (unverified: `land` takes it, after
        the stream ended without error). Each chunk's bytes
        are dropped once copied, so the allocator reuses their memory (keeping them all and
        unpacking from them costs more in page faults than the copy)."""
        address = handle.source_address
        method = self.channels.get(address).unary_stream(
            f"/{SERVICE}/PullKV", request_serializer=kv_codec.pull_kv_request_to_bytes, response_deserializer=None
        )
        request = kv_codec.PullKVRequest(
            handle.request_id, src, store.layout.describe(), self.config.max_chunk_bytes, handle.lease_secret, hashes
        )
        expected = ExpectedChunks(len(buffer), store.layout.kv_dtype, store.packed_shape(len(src)), address)
        target = buffer.numpy()
        call = method(request, timeout=timeout_s)
        offset = num_chunks = 0
        last: ChunkView | None = None  # the one that ends at the total: `land` checks and copies it
        copying: asyncio.Future[None] | None = None  # the previous one, checked and copied in a thread
        try:
            async for raw in call:
                chunk = expected.check(raw, offset)
                offset += len(chunk.data)
                num_chunks += 1
                if copying is not None:
                    await copying
                    copying = None
                if offset < expected.total_bytes:
                    copying = asyncio.ensure_future(asyncio.to_thread(verify_and_copy, chunk, target, address))
                else:
                    last = chunk
            if copying is not None:
                await copying
        except grpc.aio.AioRpcError as exc:
            await settle(copying)
            raise await self.channels.fail(exc, address) from None
        except KVTransferError:
            call.cancel()
            await settle(copying)
            raise
        except asyncio.CancelledError:
            settle_later(copying)
            raise
        if last is None or offset != expected.total_bytes:
            raise KVTransferError(
                FailureReason.PROTOCOL, f"{address}: stream ended after {offset} of {expected.total_bytes} bytes"
            )
        return num_chunks, last

    async def release(self, handle: KVHandle, timeout_s: float) -> bool:
        return await release_remote(self.channels, handle, timeout_s)

    async def close(self) -> None:
        for servicer in self._servicers:
            servicer.close()
        await self.channels.close()


def _close_stack(stack: contextlib.ExitStack, _: Future) -> None:
    stack.close()
