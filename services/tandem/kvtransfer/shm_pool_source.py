"""Same-host KV with one copy: the receiver copies the leased blocks straight out of the
source's KV cache, which a CPU prefill worker keeps in a shared pool file
(engine.kv_cache.allocate_shared, `--kv-shm`).

Lifecycle of one pull (decode worker D with a CPU cache, prefill worker P, same host id):
1. D opens the bidirectional stream `P.PullKVShmPool` and sends the PullKVShm request (no
   segment). P admits it as PullKVShm does and answers UNIMPLEMENTED if its cache is not a
   shared pool (a CUDA cache): D then uses the segment path (shm_transport.py) with P for good.
2. P checks the lease out (pinned: neither freed nor reused while the stream lasts) and sends
   its pool's name, owner pid and block count; then, in a thread, one crc32c (one of the wire
   contract's two) per chunk of the packed layout (shm_pool_copy.py), and sends the digests.
   Each is combined from the per-block crc32c taken when the lease was granted
   (block_digests.py: the pull reads no block); a lease granted before the source served has
   none, and its chunks are hashed from the pool now.
3. Meanwhile D maps the pool read-only (once per source pid, re-checked each pull: a pool file
   named for that pid in our pid namespace, a regular file of our uid, exactly `num_blocks *
   bytes_per_block` bytes; shm_pool_mapping.py), checks the block ids are in range, and on
   reader threads (the chunks split among them) copies the blocks into its own reserved blocks
   a run at a time, hashing each run in the destination while it is still in cache. With the
   copy done and P's digests in,
   D compares the digests (step 4) and half-closes the stream: only then does P leave the
   checkout. A receiver that will not pull the lease again (`release=True`: a decode worker's
   one pull per hand-off) first sends the request once more on the stream: the blocks are
   verified, and P releases the lease (`LeaseTable.release`, the secret checked as for
   ReleaseKV) instead of waiting for a ReleaseKV call, which D then skips (the pull's
   `TransferStats.released`, decode/handoff.py).
   A pull that failed never sends it: D cancels the call and calls ReleaseKV as before.
   From D's second pull from P on, D starts the copy out of the pool P answered with last time
   as soon as it has sent the request, without waiting for P's first answer (one round trip
   less): the result counts only if the answer names that same pool and P's digest matches;
   else D copies again out of the pool named. Reading before P checked the lease reveals
   nothing (D could read the file anyway: same uid) and trusts nothing (P's digest vouches).
4. D compares the digests before it half-closes: a difference is a CHECKSUM failure (fail
   closed: the destination blocks are undefined and given back uncached, base.py; the lease is
   not released by the pull). Any other failure goes through same_host.py's rules (a pool D
   cannot map or use: REFUSED, then the network path).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Protocol

import grpc
import numpy as np

from tandem.common import kv_codec
from tandem.common.plane_auth import ClusterToken
from tandem.engine.kv_cache import shared_pool_path
from tandem.kvtransfer.base import FailureReason, KVTransferError, run_to_completion
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVICE, ChannelCache
from tandem.kvtransfer.grpc_transport import lease_status
from tandem.kvtransfer.leases import LeaseError, LeaseTable
from tandem.kvtransfer.shm_pool_copy import chunks, copy_and_hash, copy_threads, planes
from tandem.kvtransfer.shm_pool_mapping import PoolMapping, PoolMappings
from tandem.kvtransfer.shm_segments import sweep_dead


class PoolSource(Protocol):
    """What `serve_pool` needs of the source's servicer (shm_source.ShmKVServicer)."""

    store: KVBlockStore
    leases: LeaseTable
    num_pulls_served: int

    async def admit(
        self, request: kv_codec.PullKVRequest, context: grpc.aio.ServicerContext, segment: bool = True
    ) -> None: ...

    def hash_pool(self, request_id: str, block_ids: tuple[int, ...]) -> list[int]: ...


METHOD = "PullKVShmPool"
Copier = Callable[..., Awaitable[Any]]  # runs a function in a reader thread, joined even if cancelled


async def serve_pool(
    servicer: PoolSource, requests: AsyncIterator[kv_codec.PullKVRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[kv_codec.ShmPool]:
    """Source side of PullKVShmPool (module doc, steps 1-2)."""
    request = await anext(requests, None)
    if request is None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PullKVShmPool: no request")
        return
    await servicer.admit(request, context, segment=False)
    path = shared_pool_path(servicer.store.kv_caches)
    if path is None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this source's KV cache is not a shared pool")
        return
    try:
        with servicer.leases.checkout(
            request.request_id, request.block_ids, request.lease_secret, request.block_hashes
        ):
            ids = servicer.store.check_block_ids(request.block_ids)
            yield kv_codec.ShmPool(os.path.basename(path), servicer.store.num_blocks, os.getpid(), ())
            checksums = await run_to_completion(servicer.hash_pool, request.request_id, ids)
            yield kv_codec.ShmPool("", 0, 0, tuple(checksums))
            servicer.num_pulls_served += 1
            # pinned until the receiver half-closes (its copy is verified) or goes
            async for verified in requests:  # the request again: release the lease (module doc, step 3)
                if verified.request_id == request.request_id:
                    servicer.leases.release(verified.request_id, verified.lease_secret)
    except LeaseError as exc:
        await context.abort(lease_status(exc), str(exc))


def copy_checked(
    mapping: PoolMapping, check: bool, src: tuple[int, ...], dst_planes: list[np.ndarray], dst: tuple[int, ...]
) -> list[int] | None:
    """Reader thread: every chunk copied out of `mapping` (`copy_and_hash`); None, with
    nothing written, if `check` and the mapping is no longer valid. One thread hop for a
    small pull's check and copy."""
    if check and not mapping.still_valid():
        return None
    return copy_and_hash(mapping.planes, src, dst_planes, dst)


async def pull_from_pool(
    call: grpc.aio.StreamStreamCall[kv_codec.PullKVRequest, kv_codec.ShmPool],
    request: kv_codec.PullKVRequest,
    mappings: PoolMappings,
    store: KVBlockStore,
    dst_planes: list[np.ndarray],
    dst: tuple[int, ...],
    copy: Copier,
    address: str,
    release: bool = False,
) -> int:
    """Receiver side (module doc, steps 1, 3, 4) on an open call; returns the number of chunks.
    `dst_planes`: `planes(store.kv_caches)`. With `release`, a verified pull asks the source to
    release the lease. grpc.aio.AioRpcError as the call raises it (UNIMPLEMENTED: the source
    has no shared pool); KVTransferError else."""
    src = request.block_ids
    plan = chunks(len(dst_planes), len(src), dst_planes[0].shape[1])
    num_threads = copy_threads(len(plan), len(src) * store.bytes_per_block)
    parts = [range(i, len(plan), num_threads) for i in range(num_threads)]

    async def copy_all(mapping: PoolMapping, check: bool) -> list[int] | None:
        """The chunks' digests, copied in `parts` on reader threads; None (nothing written)
        if `check` and the mapping is no longer valid or too small for `src`."""
        if check and max(src) >= mapping.num_blocks:
            return None
        if len(parts) == 1:
            return await copy(copy_checked, mapping, check, src, dst_planes, dst)
        if check and not await copy(mapping.still_valid):
            return None
        done = await asyncio.gather(*(copy(copy_and_hash, mapping.planes, src, dst_planes, dst, p) for p in parts))
        digests = [0] * len(plan)
        for part, values in zip(parts, done, strict=True):
            for index, value in zip(part, values, strict=True):
                digests[index] = value
        return digests

    await call.write(request)
    # A source answered before: copy out of its pool while its answer is on the way (it is
    # only trusted if the answer names that pool and the source's digests match)
    guess = mappings.last(address)
    early = None if guess is None else asyncio.ensure_future(copy_all(guess, True))
    try:
        first = await call.read()
        if first is grpc.aio.EOF or not isinstance(first, kv_codec.ShmPool) or not first.name:
            raise KVTransferError(FailureReason.PROTOCOL, f"{address}: PullKVShmPool sent no pool")
        bad = next((b for b in src if b >= first.num_blocks), None)
        if bad is not None:
            raise KVTransferError(
                FailureReason.PROTOCOL, f"{address}: block {bad} is outside its pool of {first.num_blocks}"
            )
        digests = None if early is None else await early
    finally:
        if early is not None:
            await _settle(early)  # no block is written after the pull ends
    named = (os.path.join(mappings.directory, first.name), first.source_pid, first.num_blocks)
    if digests is None or guess is None or (guess.path, guess.source_pid, guess.num_blocks) != named:

        def map_pool() -> PoolMapping:  # in a reader thread: the mapping's checks
            try:
                return mappings.get(first.name, first.source_pid, store, first.num_blocks)
            except (OSError, ValueError) as exc:
                raise KVTransferError(FailureReason.REFUSED, f"{address}: cannot use its KV pool: {exc}") from None

        mapping = await copy(map_pool)
        mappings.remember(address, mapping)
        digests = await copy_all(mapping, False)
    second = await call.read()
    if second is grpc.aio.EOF or not isinstance(second, kv_codec.ShmPool) or second.name:
        raise KVTransferError(FailureReason.PROTOCOL, f"{address}: PullKVShmPool sent no checksums")
    if digests != list(second.checksums):
        bad_chunk = next((i for i, (a, b) in enumerate(zip(digests or [], second.checksums)) if a != b), None)
        raise KVTransferError(
            FailureReason.CHECKSUM,
            f"{address}: blocks copied from pool {first.name}: {len(second.checksums)} chunk checksums for "
            f"{len(plan)} chunks, first differing chunk {bad_chunk}",
        )
    if release:  # verified: the source releases the lease (no ReleaseKV call follows)
        await call.write(request)
    await call.done_writing()
    return len(plan)


async def _settle(task: asyncio.Future[Any]) -> None:
    """Wait for `task` to end, also if we are cancelled meanwhile (re-raised then); its own
    failure is left to whoever awaits its result."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class PoolPuller:
    """The receiver's one-copy pulls (ShmTransport's, on its loop): `no_pool` holds the source
    addresses that answered UNIMPLEMENTED (no shared pool: the segment path serves them).

    Its channels carry no client interceptor: each call presents `token` in its own metadata.
    grpc.aio runs an intercepted stream through an extra task and queue per message, which cost
    the receiver's asyncio thread, shared with the step loop, about 0.1 ms a pull."""

    def __init__(self, readers: Executor, shm_dir: str, token: ClusterToken | None) -> None:
        self.channels, self.readers, self.shm_dir = ChannelCache(), readers, shm_dir
        self.metadata = () if token is None else token.metadata()
        self.pools = PoolMappings(shm_dir)  # sources' shared KV pools, mapped read-only
        self.no_pool: set[str] = set()
        self._ending: set[asyncio.Future[None]] = set()  # good pulls' calls, waiting for the source's status
        self._planes: tuple[KVBlockStore, list[np.ndarray]] | None = None  # a store's planes, made once

    def dst_planes(self, store: KVBlockStore) -> list[np.ndarray]:
        """`planes(store.kv_caches)`, kept: a receiver's cache lives as long as the process."""
        if self._planes is None or self._planes[0] is not store:
            self._planes = (store, planes(store.kv_caches))
        return self._planes[1]

    async def pull(
        self,
        request: kv_codec.PullKVRequest,
        address: str,
        dst: tuple[int, ...],
        store: KVBlockStore,
        timeout_s: float,
        release: bool = False,
    ) -> int:
        """One pull out of the source's shared pool: its number of chunks; 0 if the source has
        no shared pool. With `release`, a pull that succeeds has asked the source to release the
        lease. KVTransferError if it fails (same_host.py decides what follows)."""
        loop = asyncio.get_running_loop()

        async def copy(fn: Callable[..., Any], *args: Any) -> Any:  # on our readers; joined even if cancelled
            task = loop.run_in_executor(self.readers, fn, *args)
            await _settle(task)
            return task.result()

        call = open_call(self.channels.get(address), timeout_s, self.metadata)
        done = False
        try:
            num_chunks = await pull_from_pool(
                call, request, self.pools, store, self.dst_planes(store), dst, copy, address, release
            )
            done = True
            return num_chunks
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                self.no_pool.add(address)
                return 0
            error = await self.channels.fail(exc, address)
            if error.reason is FailureReason.PEER_UNAVAILABLE:
                await asyncio.to_thread(sweep_dead, self.shm_dir)  # a dead source's pool
            raise error from None
        finally:
            if done:  # we half-closed: the source unpins and ends the call; its status is read aside
                ending = asyncio.ensure_future(_status(call))
                self._ending.add(ending)
                ending.add_done_callback(self._ending.discard)
            else:  # the source stops pinning the lease now
                call.cancel()

    async def close(self) -> None:
        self.pools.close()
        for ending in list(self._ending):
            ending.cancel()
        await self.channels.close()


async def _status(call: grpc.aio.StreamStreamCall[kv_codec.PullKVRequest, kv_codec.ShmPool]) -> None:
    """Wait for the end of a good pull's call (within its deadline). Cancelling it instead
    would cost the receiver about 1.5 ms of CPU a pull in grpc.aio (measured on the 2-core
    development machine), and the source's pin ends on our half-close either way."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        await call.code()


def open_call(
    channel: grpc.aio.Channel, timeout_s: float, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.StreamStreamCall[kv_codec.PullKVRequest, kv_codec.ShmPool]:
    method = channel.stream_stream(
        f"/{SERVICE}/{METHOD}",
        request_serializer=kv_codec.pull_kv_request_to_bytes,
        response_deserializer=kv_codec.shm_pool_from_bytes,
    )
    return method(timeout=timeout_s, metadata=metadata)
