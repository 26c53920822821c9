"""Source side of the same-host segment path: PullKVShm (and the one-copy path's
PullKVShmPool, shm_pool_source.py) on the prefill worker's gRPC server.

Lifecycle of one pull on P (the whole pull, and the receiver's side: shm_transport.py):
1. `admit` refuses what PullKV refuses, with the same codes, another host id and a malformed
   segment name (shm_transport.py, step 2).
2. Holding the lease checked out, `pack_into` packs the blocks into the segment the receiver
   lent (mapped through shm_pool.LentSegments, which owns none of them), chunk by chunk in a
   thread, publishing its progress in the segment's header (shm_chunks.py), and the call
   answers name, size and the xxh64 of all the bytes.
3. A janitor task (started with the first pull) unmaps the lent segments whose file is gone or
   whose receiver died, unlinks the latter, and sweeps the directory every SWEEP_PERIOD_S.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
import torch

from tandem.common import kv_codec
from tandem.common.layout import KVLayout
from tandem.engine.kv_cache import shared_pool_path
from tandem.kvtransfer.base import run_to_completion
from tandem.kvtransfer.block_digests import combine
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVICE
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import lease_status
from tandem.kvtransfer.leases import LeaseError, LeaseTable
from tandem.kvtransfer.shm_chunks import HEADER_BYTES, ChunkPlan, progress_word, write_chunks
from tandem.kvtransfer.shm_pool import POOL_MAX_BYTES, SEGMENT_ALIGN_BYTES, LentSegments
from tandem.kvtransfer.shm_pool_copy import chunks, hash_chunks, planes
from tandem.kvtransfer.shm_pool_source import METHOD as POOL_METHOD
from tandem.kvtransfer.shm_pool_source import serve_pool
from tandem.kvtransfer.shm_segments import SWEEP_PERIOD_S, Segment, sweep_dead

log = logging.getLogger(__name__)

JANITOR_PERIOD_S = 0.5  # how often the source unmaps segments gone and unlinks dead receivers' ones
MAX_SEGMENT_NAME = 128


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
