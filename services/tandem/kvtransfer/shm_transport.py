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
2. P (`ShmKVServicer.PullKVShm`, shm_source.py) refuses what PullKV refuses, with the same codes (layout:
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
   pull failed. D then calls ReleaseKV as for every transport, unless the pull released the
   lease already: a decode worker's verified one-copy pull does (shm_pool_source.py, step 3),
   and says so in its stats (`TransferStats.released`).
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
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from tandem.common import kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.kvtransfer.base import CheckedPull, FailureReason, KVTransferError, TransferStats, run_to_completion
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import ChannelCache
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.shm_chunks import HEADER_BYTES, ChunkPlan, progress_word, read_chunks
from tandem.kvtransfer.shm_pool import SegmentPool
from tandem.kvtransfer.shm_pool_source import PoolPuller
from tandem.kvtransfer.shm_segments import SWEEP_PERIOD_S, Segment, sweep_dead

log = logging.getLogger(__name__)

READER_THREADS = 8  # a receiver's concurrent chunk readers (more pulls wait for one, then read at once)


class ShmTransport(CheckedPull):
    """Receiver side; one per decode worker, used from its asyncio loop (via SameHostTransport)."""

    name = "shm"

    def __init__(self, config: KVTransferConfig, host_id: str, release_with_pull: bool = False) -> None:
        """`release_with_pull`: the receiver pulls each lease once (a decode worker), so a
        verified one-copy pull releases the lease at the source (shm_pool_source.py, step 3)
        and its stats say `released`: the caller then sends no ReleaseKV."""
        self.config, self.host_id = config, host_id
        self.release_with_pull = release_with_pull
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
            num_chunks = await self.pooled.pull(
                request, handle.source_address, dst, store, timeout_s, self.release_with_pull
            )
            if num_chunks:
                seconds = time.perf_counter() - started
                return TransferStats(
                    size_bytes, seconds, len(src), num_chunks, transport=self.name, released=self.release_with_pull
                )
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
