"""Same-host KV with one copy: the receiver copies the leased blocks straight out of the
source's KV cache, which a CPU prefill worker keeps in a shared pool file
(engine.kv_cache.allocate_shared, `--kv-shm`).

Lifecycle of one pull (decode worker D with a CPU cache, prefill worker P, same host id):
1. D opens the bidirectional stream `P.PullKVShmPool` and sends the PullKVShm request (no
   segment). P admits it as PullKVShm does and answers UNIMPLEMENTED if its cache is not a
   shared pool (a CUDA cache): D then uses the segment path (shm_transport.py) with P for good.
2. P checks the lease out (pinned: neither freed nor reused while the stream lasts) and sends
   its pool's name, owner pid and block count; then hashes the leased blocks in a thread, in
   the packed layout's order (xxh64, the wire contract's), and sends the digest.
3. Meanwhile D maps the pool read-only (once per source pid, re-checked each pull: a pool file
   named for that pid in our pid namespace, a regular file of our uid, exactly `num_blocks *
   bytes_per_block` bytes), checks the block ids are in range, and in a reader thread copies
   the blocks into its own reserved blocks a run at a time (at most CHUNK_BYTES), hashing each
   run in the destination while it is still in cache. With the copy done and P's digest in,
   D half-closes the stream: only then does P leave the checkout, and D calls ReleaseKV later.
   From D's second pull from P on, D starts the copy out of the pool P answered with last time
   as soon as it has sent the request, without waiting for P's first answer (one round trip
   less): the result counts only if the answer names that same pool and P's digest matches;
   else D copies again out of the pool named. Reading before P checked the lease reveals
   nothing (D could read the file anyway: same uid) and trusts nothing (P's digest vouches).
4. D compares the digests: a difference is a CHECKSUM failure (fail closed: the destination
   blocks are undefined and given back uncached, base.py). Any other failure goes through
   same_host.py's rules (a pool D cannot map or use: REFUSED, then the network path).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
import xxhash

from tandem.common import kv_codec
from tandem.engine.kv_cache import shared_pool_path
from tandem.kvtransfer.base import FailureReason, KVTransferError, run_to_completion
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVICE
from tandem.kvtransfer.grpc_transport import lease_status
from tandem.kvtransfer.leases import LeaseError
from tandem.kvtransfer.shm_chunks import CHUNK_BYTES
from tandem.kvtransfer.shm_segments import SegmentName, pid_alive, pid_namespace

if TYPE_CHECKING:
    from tandem.kvtransfer.shm_transport import ShmKVServicer

METHOD = "PullKVShmPool"
Run = tuple[int, int, int]  # (first source block id, first destination block id, length)
Copier = Callable[..., Awaitable[Any]]  # runs copy_and_hash in a reader thread, joined even if cancelled


def runs(src: tuple[int, ...], dst: tuple[int, ...], max_len: int) -> list[Run]:
    """The pull as runs consecutive on both sides, in order, each at most `max_len` blocks."""
    out: list[Run] = []
    for s, d in zip(src, dst, strict=True):
        if out and out[-1][2] < max_len and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def planes(kv_caches: list[torch.Tensor]) -> list[np.ndarray]:
    """The cache's planes (layer, then K/V) as `[num_blocks, block bytes]` uint8 arrays, no
    copy: numpy slices cost far less per run than torch ops (a pull has hundreds of runs)."""
    return [cache[kv].reshape(cache.shape[1], -1).view(torch.uint8).numpy() for cache in kv_caches for kv in (0, 1)]


def hash_blocks(src_planes: list[np.ndarray], block_ids: tuple[int, ...]) -> int:
    """Source, worker thread, lease checked out: the xxh64 of the blocks in the packed layout."""
    hasher = xxhash.xxh64()
    for plane in src_planes:
        for s, _, n in runs(block_ids, block_ids, max(1, CHUNK_BYTES // plane.shape[1])):
            hasher.update(plane[s : s + n].data)
    return hasher.intdigest()


def copy_and_hash(
    src_planes: list[np.ndarray], src: tuple[int, ...], dst_planes: list[np.ndarray], dst: tuple[int, ...]
) -> int:
    """Receiver, worker thread: copy blocks `src` of the source's pool into blocks `dst` of our
    cache run by run (at most CHUNK_BYTES), hashing each run in the destination right after its
    copy, while it is in cache; returns the xxh64 of what was written, in the packed layout's
    order (`hash_blocks`' order)."""
    hasher = xxhash.xxh64()
    plan = runs(src, dst, max(1, CHUNK_BYTES // dst_planes[0].shape[1]))
    for src_plane, dst_plane in zip(src_planes, dst_planes, strict=True):
        for s, d, n in plan:
            rows = dst_plane[d : d + n]
            rows[...] = src_plane[s : s + n]
            hasher.update(rows.data)
    return hasher.intdigest()


class PoolMapping:
    """A source's pool mapped read-only: per layer `[2, num_blocks, ...]` tensors over it."""

    def __init__(self, directory: str, name: str, source_pid: int, store: KVBlockStore, num_blocks: int) -> None:
        parts = SegmentName.parse(name)
        if parts is None or not parts.pool or parts.namespace != pid_namespace() or parts.receiver_pid != source_pid:
            raise ValueError(f"{name[:120]!r} is not a KV pool of source pid {source_pid} in this namespace")
        self.path, self.source_pid, self.num_blocks = os.path.join(directory, name), source_pid, num_blocks
        self.size_bytes = num_blocks * store.bytes_per_block
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            self.inode = info.st_ino
            self._check(info)
            mapped = mmap.mmap(fd, self.size_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        # read-only: nothing here can write the source's cache; the arrays keep the mapping alive
        flat = np.frombuffer(mapped, dtype=np.uint8)
        self.planes = list(flat.reshape(2 * store.layout.num_layers, num_blocks, -1))

    def _check(self, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ValueError(f"KV pool {self.path} is not a regular file of uid {os.geteuid()}")
        if info.st_size != self.size_bytes:
            raise ValueError(f"KV pool {self.path} has {info.st_size} bytes, the layout needs {self.size_bytes}")

    def still_valid(self) -> bool:
        """The same file is still there with its size, and its owner runs (checked per pull)."""
        try:
            info = os.stat(self.path, follow_symlinks=False)
            self._check(info)
        except (OSError, ValueError):
            return False
        return info.st_ino == self.inode and pid_alive(self.source_pid)


class PoolMappings:
    """The receiver's mappings, one per source pid. A replaced one is only dropped, never
    unmapped: a reader thread may still use it (the tensors keep the mapping alive)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._by_pid: dict[int, PoolMapping] = {}
        self._by_address: dict[str, PoolMapping] = {}  # the pool a source address last answered with

    def last(self, address: str) -> PoolMapping | None:
        return self._by_address.get(address)

    def remember(self, address: str, mapping: PoolMapping) -> None:
        self._by_address[address] = mapping

    def get(self, name: str, source_pid: int, store: KVBlockStore, num_blocks: int) -> PoolMapping:
        """ValueError if the pool may not be used, OSError if it cannot be opened."""
        known = self._by_pid.get(source_pid)
        path = os.path.join(self.directory, name)
        if known is not None and known.path == path and known.num_blocks == num_blocks and known.still_valid():
            return known
        self._by_pid.pop(source_pid, None)
        mapping = PoolMapping(self.directory, name, source_pid, store, num_blocks)
        self._by_pid[source_pid] = mapping
        return mapping

    def close(self) -> None:
        self._by_pid.clear()
        self._by_address.clear()


async def serve_pool(
    servicer: ShmKVServicer, requests: AsyncIterator[kv_codec.PullKVRequest], context: grpc.aio.ServicerContext
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
            yield kv_codec.ShmPool(os.path.basename(path), servicer.store.num_blocks, os.getpid(), 0)
            checksum = await run_to_completion(servicer.hash_pool, ids)
            yield kv_codec.ShmPool("", 0, 0, checksum)
            servicer.num_pulls_served += 1
            async for _ in requests:  # pinned until the receiver half-closes (its copy is done) or goes
                pass
    except LeaseError as exc:
        await context.abort(lease_status(exc), str(exc))


async def pull_from_pool(
    call: grpc.aio.StreamStreamCall[kv_codec.PullKVRequest, kv_codec.ShmPool],
    request: kv_codec.PullKVRequest,
    mappings: PoolMappings,
    store: KVBlockStore,
    dst: tuple[int, ...],
    copy: Copier,
    address: str,
) -> None:
    """Receiver side (module doc, steps 1, 3, 4) on an open call. grpc.aio.AioRpcError as the
    call raises it (UNIMPLEMENTED: the source has no shared pool); KVTransferError else."""
    src, dst_planes = request.block_ids, planes(store.kv_caches)
    await call.write(request)
    # A source answered before: copy out of its pool while its answer is on the way (it is
    # only trusted if the answer names that pool and the source's digest matches)
    guess = mappings.last(address)
    early = None if guess is None else asyncio.ensure_future(copy(_copy_if_valid, guess, src, dst_planes, dst))
    try:
        first = await call.read()
        if first is grpc.aio.EOF or not isinstance(first, kv_codec.ShmPool) or not first.name:
            raise KVTransferError(FailureReason.PROTOCOL, f"{address}: PullKVShmPool sent no pool")
        bad = next((b for b in src if b >= first.num_blocks), None)
        if bad is not None:
            raise KVTransferError(
                FailureReason.PROTOCOL, f"{address}: block {bad} is outside its pool of {first.num_blocks}"
            )
        digest = None if early is None else await early
    finally:
        if early is not None:
            await _settle(early)  # no block is written after the pull ends
    path = os.path.join(mappings.directory, first.name)
    if (
        digest is None
        or guess is None
        or (guess.path, guess.source_pid, guess.num_blocks)
        != (
            path,
            first.source_pid,
            first.num_blocks,
        )
    ):

        def map_and_copy() -> int:  # in a reader thread: the mapping's checks, then the copy
            try:
                mapping = mappings.get(first.name, first.source_pid, store, first.num_blocks)
            except (OSError, ValueError) as exc:
                raise KVTransferError(FailureReason.REFUSED, f"{address}: cannot use its KV pool: {exc}") from None
            mappings.remember(address, mapping)
            return copy_and_hash(mapping.planes, src, dst_planes, dst)

        digest = await copy(map_and_copy)
    second = await call.read()
    await call.done_writing()
    if second is grpc.aio.EOF or not isinstance(second, kv_codec.ShmPool) or second.name:
        raise KVTransferError(FailureReason.PROTOCOL, f"{address}: PullKVShmPool sent no checksum")
    if digest != second.checksum:
        raise KVTransferError(
            FailureReason.CHECKSUM,
            f"{address}: blocks copied from pool {first.name} have xxh64 {digest:#018x}, the source sent "
            f"{second.checksum:#018x}",
        )


def _copy_if_valid(
    mapping: PoolMapping, src: tuple[int, ...], dst_planes: list[np.ndarray], dst: tuple[int, ...]
) -> int | None:
    """The early copy: None (nothing written) unless the pool is still valid and holds `src`."""
    if max(src) >= mapping.num_blocks or not mapping.still_valid():
        return None
    return copy_and_hash(mapping.planes, src, dst_planes, dst)


async def _settle(task: asyncio.Future[object]) -> None:
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


def open_call(
    channel: grpc.aio.Channel, timeout_s: float
) -> grpc.aio.StreamStreamCall[kv_codec.PullKVRequest, kv_codec.ShmPool]:
    method = channel.stream_stream(
        f"/{SERVICE}/{METHOD}",
        request_serializer=kv_codec.pull_kv_request_to_bytes,
        response_deserializer=kv_codec.shm_pool_from_bytes,
    )
    return method(timeout=timeout_s)
