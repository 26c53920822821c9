"""The same-host KV transport: the source packs the blocks into a shared-memory segment that
the receiver lends it, the receiver verifies them there and copies them into its reserved
blocks (segments: shm_segments.py; their reuse: shm_pool.py). A CPU receiver first tries the
one-copy path (shm_pool_source.py: it copies straight out of the source's KV cache when that
is a shared pool file, as a CPU prefill worker's is); the segment path below serves CUDA
caches on either side.

Lifecycle of one pull (decode worker D, prefill worker P, same host id):
1. D checks its arguments (`check_pull`), takes a segment of at least the pull's size from its
   pool, and calls `P.PullKVShm` with the PullKV fields plus its host id, its pid and the
   segment's name, under the pull's deadline.
2. P (`ShmKVServicer.PullKVShm`) refuses what PullKV refuses, with the same codes (layout:
   FAILED_PRECONDITION; malformed: INVALID_ARGUMENT; lease, secret, block ids: NOT_FOUND; block
   hashes: FAILED_PRECONDITION "block hashes differ ..."), another host id
   (PERMISSION_DENIED), and a segment it cannot open (NOT_FOUND) or may not use
   (INVALID_ARGUMENT). Holding the lease checked out, it packs the blocks into the segment in
   a thread, chunk by chunk, hashing each and publishing its progress in the segment's header
   (shm_chunks.py), and answers name, size and the xxh64 of all the bytes. It keeps the
   segment mapped for D's next pull, and writes into it only during a call.
3. Meanwhile a reader thread of D hashes each published chunk and copies it into the
   destination blocks (a CUDA cache: after the check). When the answer comes, D checks the
   size and the xxh64 against it; on a failure the destination blocks are undefined (base.py)
   and D gives them back uncached. It gives the segment back to its pool, or unlinks it if the
   pull failed. D then calls ReleaseKV as for every transport.
`same_host.SameHostTransport` decides when to use this and falls back to the network.

Costs of a 64 MiB pull on the development machine (2-core EPYC, one torch thread a side, quiet):
the source's pack 5.5 ms and xxh64 6.5 ms, the receiver's xxh64 6.5 ms and unpack 6 ms; an
in-process memcpy of the same bytes takes 5.7 ms. xxh64 (the wire contract's checksum) reads at
~10 GB/s there, no faster than memory, so hashing fused with the copy saves little: the two
sides working at once is what brings a pull near one side's 12 ms (before issue 20's work: a
fresh segment per pull, 48 ms of page faults, and the sides one after the other).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from tandem.common import kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.engine.kv_cache import shared_pool_path
from tandem.kvtransfer.base import CheckedPull, FailureReason, KVTransferError, TransferStats, run_to_completion
from tandem.kvtransfer.block_digests import combine
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVICE, ChannelCache
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import lease_status
from tandem.kvtransfer.leases import LeaseError, LeaseTable
from tandem.kvtransfer.shm_chunks import HEADER_BYTES, ChunkPlan, progress_word, read_chunks, write_chunks
from tandem.kvtransfer.shm_pool import POOL_MAX_BYTES, SEGMENT_ALIGN_BYTES, LentSegments, SegmentPool
from tandem.kvtransfer.shm_pool_copy import chunks, hash_chunks, planes
from tandem.kvtransfer.shm_pool_source import METHOD as POOL_METHOD
from tandem.kvtransfer.shm_pool_source import PoolPuller, serve_pool
from tandem.kvtransfer.shm_segments import Segment, sweep_dead

log = logging.getLogger(__name__)

JANITOR_PERIOD_S = 0.5  # how often the source unmaps segments gone and unlinks dead receivers' ones
SWEEP_PERIOD_S = 10.0  # how often either side sweeps the directory for any dead receiver's segments
MAX_SEGMENT_NAME = 128
READER_THREADS = 8  # a receiver's concurrent chunk readers (more pulls wait for one, then read at once)


class ShmKVServicer:
    """Source side: the PullKVShm method of the KVTransfer service, on P's grpc.aio server.
    Maps the segments receivers lend it (shm_pool.LentSegments); owns none of them."""

    def __init__(self, store: KVBlockStore, leases: LeaseTable, config: KVTransferConfig, host_id: str) -> None:
        self.store, self.leases, self.config, self.host_id = store, leases, config, host_id
        self.lent = LentSegments(config.shm_dir)
        # for hash_pool: only a CPU cache can be a shared pool (a CUDA one has no numpy view)
        self.planes = planes(store.kv_caches) if store.device.type == "cpu" else []
        # the one-copy path's sources (a shared pool) hash each lease's blocks once, at grant
        self.digests = leases.digests_for(store) if shared_pool_path(store.kv_caches) is not None else None
        pull_bytes = config.max_blocks_per_pull * store.bytes_per_block
        self.max_segment_bytes = max(-(-pull_bytes // SEGMENT_ALIGN_BYTES) * SEGMENT_ALIGN_BYTES, POOL_MAX_BYTES)
        self._janitor: asyncio.Task[None] | None = None
        self.num_pulls_served = 0
        sweep_dead(config.shm_dir)

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.PullKVShm,
            request_deserializer=kv_codec.pull_kv_request_from_bytes,
            response_serializer=kv_codec.shm_segment_to_bytes,
        )
        pool_handler = grpc.stream_stream_rpc_method_handler(
            functools.partial(serve_pool, self),
            request_deserializer=kv_codec.pull_kv_request_from_bytes,
            response_serializer=kv_codec.shm_pool_to_bytes,
        )
        methods = {"PullKVShm": handler, POOL_METHOD: pool_handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))

    def hash_pool(self, request_id: str, block_ids: tuple[int, ...]) -> list[int]:
        """Worker thread, lease checked out: the crc32c of each chunk of the blocks in the
        shared pool (shm_pool_copy.py), combined from the digests taken when the lease was
        granted (block_digests.py), else read from the pool now. Tests override it to corrupt
        a digest."""
        committed = None if self.digests is None else self.digests.for_pull(request_id, block_ids)
        if committed is None:
            return hash_chunks(self.planes, block_ids)
        plan = chunks(len(self.planes), len(block_ids), self.planes[0].shape[1])
        return combine(committed, self.planes[0].shape[1], [plane * len(block_ids) + first for plane, first, _ in plan])

    def pack_into(self, plan: ChunkPlan, segment_view: torch.Tensor) -> int:
        """Worker thread, lease checked out: pack the pull into the segment (its uint8 view),
        publishing chunk after chunk (shm_chunks.py); return the xxh64 of the packed bytes.
        Tests override it to corrupt bytes or hang."""
        data = segment_view[HEADER_BYTES : HEADER_BYTES + plan.size_bytes]
        return write_chunks(plan, data, progress_word(segment_view))

    async def PullKVShm(
        self, request: kv_codec.PullKVRequest, context: grpc.aio.ServicerContext
    ) -> kv_codec.ShmSegment:
        await self.admit(request, context)
        self._start_janitor()
        block_ids = request.block_ids
        size_bytes = len(block_ids) * self.store.bytes_per_block
        segment = await self._checkout(request, HEADER_BYTES + size_bytes, context)
        try:
            with self.leases.checkout(request.request_id, block_ids, request.lease_secret, request.block_hashes):
                plan = ChunkPlan(self.store, self.store.check_block_ids(block_ids))
                sum64 = await run_to_completion(self.pack_into, plan, segment.view)
        except LeaseError as exc:
            await context.abort(lease_status(exc), str(exc))
        finally:
            self.lent.checkin(segment)
        self.num_pulls_served += 1
        return kv_codec.ShmSegment(segment.name, size_bytes, sum64)

    async def _checkout(
        self, request: kv_codec.PullKVRequest, size_bytes: int, context: grpc.aio.ServicerContext
    ) -> Segment:
        name = request.shm_segment
        try:
            return self.lent.checkout(name, request.receiver_pid, size_bytes, self.max_segment_bytes)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OSError as exc:  # REFUSED at the receiver: it falls back to the network
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cannot open the receiver's KV segment {name}: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    async def admit(
        self, request: kv_codec.PullKVRequest, context: grpc.aio.ServicerContext, segment: bool = True
    ) -> None:
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
        if segment and not 0 < len(request.shm_segment) <= MAX_SEGMENT_NAME:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a segment name of {len(request.shm_segment)} characters; 1..{MAX_SEGMENT_NAME}",
            )

    def collect(self) -> list[str]:
        """Unmap the lent segments whose file is gone or whose receiver died, unlink the
        latter; returns the names unlinked."""
        return self.lent.collect()

    def _start_janitor(self) -> None:
        if self._janitor is None or self._janitor.done():
            self._janitor = asyncio.get_running_loop().create_task(self._run_janitor())

    async def _run_janitor(self) -> None:
        swept_at = time.monotonic()
        while True:
            await asyncio.sleep(JANITOR_PERIOD_S)
            try:
                self.collect()
            except OSError as exc:  # the janitor must survive a directory that went away
                log.warning("KV segment janitor: %s", exc)
            if time.monotonic() - swept_at >= SWEEP_PERIOD_S:  # also segments this source never mapped
                swept_at = time.monotonic()
                await asyncio.to_thread(sweep_dead, self.config.shm_dir)

    def close(self) -> None:
        """Stop the janitor and unmap every lent segment (their receivers own the files)."""
        if self._janitor is not None:
            self._janitor.cancel()
        self.lent.close()


class ShmTransport(CheckedPull):
    """Receiver side; one per decode worker, used from its asyncio loop (via SameHostTransport)."""

    name = "shm"

    def __init__(self, config: KVTransferConfig, host_id: str) -> None:
        self.config, self.host_id = config, host_id
        self.channels = ChannelCache(token=config.token)
        self.pool = SegmentPool(config.shm_dir)
        self._trimmer: asyncio.Task[None] | None = None
        # readers wait on their source: their own threads, never the loop's default executor,
        # which a source's copy may need (one in this process would wait for the pull's timeout)
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="kv-shm-reader")
        self.pooled = PoolPuller(self._readers, config.shm_dir, config.token)  # the one-copy path
        sweep_dead(config.shm_dir)

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
        if self._trimmer is None:
            self._trimmer = asyncio.get_running_loop().create_task(self._trim_idle())
        size_bytes = len(src) * store.bytes_per_block
        if store.device.type == "cpu" and handle.source_address not in self.pooled.no_pool:
            request = self._request(handle, src, store, hashes, "")
            num_chunks = await self.pooled.pull(request, handle.source_address, dst, store, timeout_s)
            if num_chunks:
                seconds = time.perf_counter() - started
                return TransferStats(size_bytes, seconds, len(src), num_chunks, transport=self.name)
        segment = await self._acquire(HEADER_BYTES + size_bytes)
        done = False
        try:
            num_chunks = await self._pull_into(segment, handle, src, dst, hashes, store, timeout_s)
            done = True
        finally:
            (self.pool.give_back if done else self.pool.discard)(segment)
        return TransferStats(size_bytes, time.perf_counter() - started, len(src), num_chunks, transport=self.name)

    async def _acquire(self, size_bytes: int) -> Segment:
        """A segment from the pool (made in a thread when none fits: allocating takes a while).
        If the caller is cancelled meanwhile, the segment is unlinked once it exists."""
        task = asyncio.ensure_future(asyncio.to_thread(self.pool.acquire, size_bytes))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: None if t.cancelled() or t.exception() else self.pool.discard(t.result()))
            raise

    async def _pull_into(
        self,
        segment: Segment,
        handle: KVHandle,
        src: tuple[int, ...],
        dst: tuple[int, ...],
        hashes: tuple[int, ...],
        store: KVBlockStore,
        timeout_s: float,
    ) -> int:
        """Lend the segment for the pull, read it while the source writes, verify; returns the
        number of chunks."""
        address = handle.source_address
        call = self.channels.unary(
            address, "PullKVShm", kv_codec.pull_kv_request_to_bytes, kv_codec.shm_segment_from_bytes
        )
        request = self._request(handle, src, store, hashes, segment.name)
        plan = ChunkPlan(store, dst)
        data = segment.view[HEADER_BYTES : HEADER_BYTES + plan.size_bytes]
        progress = progress_word(segment.view)
        progress[0] = 0
        source_done = threading.Event()
        loop = asyncio.get_running_loop()
        reader = loop.run_in_executor(self._readers, read_chunks, plan, data, progress, source_done)
        try:
            answer = await call(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            error = await self.channels.fail(exc, address)
            if error.reason is FailureReason.PEER_UNAVAILABLE:
                await asyncio.to_thread(sweep_dead, self.config.shm_dir)  # segments of dead receivers
            raise error from None
        finally:
            source_done.set()
            await _join(reader)  # no block is written after the pull ends
        read_bytes, digest = reader.result()
        size_bytes = plan.size_bytes
        if answer.size_bytes != size_bytes or answer.name != segment.name or read_bytes != size_bytes:
            raise KVTransferError(
                FailureReason.PROTOCOL,
                f"{address}: answered {answer.size_bytes} bytes in {answer.name[:120]!r} and published "
                f"{read_bytes}, expected {size_bytes} in {segment.name}",
            )
        if digest != answer.checksum:
            raise KVTransferError(
                FailureReason.CHECKSUM,
                f"{address}: segment {answer.name} has xxh64 {digest:#018x}, the source sent {answer.checksum:#018x}",
            )
        if not plan.per_chunk_copies:  # read_chunks only verified (CUDA): unpack now
            await run_to_completion(store.unpack, data, dst)
        return len(plan.chunks)

    def _request(
        self, handle: KVHandle, src: tuple[int, ...], store: KVBlockStore, hashes: tuple[int, ...], segment: str
    ) -> kv_codec.PullKVRequest:
        return kv_codec.PullKVRequest(
            handle.request_id,
            src,
            store.layout.describe(),
            0,
            handle.lease_secret,
            hashes,
            self.host_id,
            os.getpid(),
            segment,
        )

    async def _trim_idle(self) -> None:
        """Unlink the pool's idle segments unused for a while, also when no pull comes, and
        sweep the segments of dead receivers."""
        while True:
            await asyncio.sleep(min(self.pool.idle_s / 2, SWEEP_PERIOD_S))
            try:
                self.pool.trim()
            except OSError as exc:  # the timer must survive a directory that went away
                log.warning("KV segment pool: %s", exc)
            await asyncio.to_thread(sweep_dead, self.config.shm_dir)

    async def close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
        self.pool.close()
        await self.pooled.close()
        self._readers.shutdown(wait=False)
        await self.channels.close()


async def _join(task: asyncio.Future[Any]) -> None:
    """Wait for `task` to end even if the caller is cancelled meanwhile (re-raised then)."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
