"""The torch.distributed KV transport: point-to-point sends over a per-pair process group,
with gRPC as the control channel (gloo on CPU, NCCL on CUDA).

Lifecycle of one pull (decode worker D, rank 1, pulls from prefill worker P, rank 0):
1. D checks its arguments (`check_pull`; its caller checked the handle's layout), finds or
   creates its pair for P's address (a new pair gets a new id; D's TCPStore, bound to
   `bind_host`, hosts it), cuts the transfer into segments and messages (torch_plan.py),
   reserves one message tag per message, and calls `P.SendKV` with the segments.
2. Concurrently, D joins the pair (new pairs only) and posts one receive per message: straight
   into its destination blocks where its ids in the message are one run (no staging copy),
   else into a staging buffer; it hashes each message as it lands.
3. P (`TorchKVServicer.SendKV`) validates exactly as PullKV does (layout, request, lease and
   its secret), also checks that the store address is on the caller's own host, joins the pair
   if it is new, and, holding the lease checked out, sends every message: straight from its
   cache where its ids are one run, else packed into staging first. It answers with the size
   and the xxh64 of the whole packed buffer once the sends complete.
4. D compares size and checksum, and only then unpacks the staged messages (if any).
Any failure aborts the pair on the side that saw it (the other side's pending operations
then fail too; an aborted pair writes nothing more) and the next pull forms a new one. A
failed pull may thus have written some destination blocks (those received directly): they
hold no KV anyone may use, and the caller gives them back uncached (base.py). Every wait is
bounded by the pull's deadline or `connect_timeout_s`; blocking calls run in a thread pool
owned by the transport/servicer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
import xxhash

from tandem.common import kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.kvtransfer.base import (
    CheckedPull,
    FailureReason,
    KVTransferError,
    TransferStats,
    run_to_completion,
)
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import ChannelCache, release_remote
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.staging import StagingPool
from tandem.kvtransfer.torch_pairs import Pair, StoreHost, host_bytes
from tandem.kvtransfer.torch_plan import Message, cache_views, plan_messages, plan_segments
from tandem.kvtransfer.torch_source import TorchKVServicer


class TorchTransport(CheckedPull):
    """Receiver side; one per decode worker, used from its asyncio loop. Owns its channels,
    its TCPStore, its pairs (one per source address) and its thread pool."""

    name = "torch"

    def __init__(self, config: KVTransferConfig) -> None:
        self.config = config
        self.channels = ChannelCache(token=config.token)
        self.staging = StagingPool(config.max_staging_bytes)
        self._executor = ThreadPoolExecutor(config.max_inflight_sends + 2, thread_name_prefix="kv-recv")
        self._store_host: StoreHost | None = None
        self._pairs: dict[str, Pair] = {}
        self._servicers: list[TorchKVServicer] = []

    def add_source(self, server: grpc.aio.Server, store: KVBlockStore, leases: LeaseTable) -> None:
        servicer = TorchKVServicer(store, leases, self.config)
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
        started, deadline_s = time.perf_counter(), time.monotonic() + timeout_s
        address = handle.source_address
        pair = self._pair_for(address, store)
        segment_ends = plan_segments(src, dst, store, self.config.direct_min_run_bytes)
        messages = plan_messages(len(src), store, segment_ends)
        first_tag = pair.reserve_tags(len(messages))
        size_bytes = len(src) * store.bytes_per_block
        call = self.channels.unary(
            address, "SendKV", kv_codec.send_kv_request_to_bytes, kv_codec.send_kv_result_from_bytes
        )
        request = kv_codec.SendKVRequest(
            request_id=handle.request_id,
            block_ids=src,
            layout=store.layout.describe(),
            store_address=self._store().address,
            pair_id=pair.pair_id,
            tag=first_tag,
            lease_secret=handle.lease_secret,
            block_hashes=hashes,
            segment_ends=segment_ends,
        )
        direct = cache_views(messages, store, dst)  # into the destination blocks
        staging = self._buffer(size_bytes, store.device) if any(v is None for v in direct) else None
        targets = [v if v is not None else _slice(staging, m) for v, m in zip(direct, messages)]
        rpc = asyncio.ensure_future(call(request, timeout=timeout_s))
        receive = asyncio.ensure_future(self._receive(pair, targets, messages, first_tag, deadline_s))
        try:
            checksum, response = await self._both(pair, address, receive, rpc)
        except BaseException:
            if staging is not None:
                self.staging.forget(staging)  # a receive may still be writing it until the abort lands
            raise
        try:
            if response.size_bytes != size_bytes or response.checksum != checksum:
                raise KVTransferError(
                    FailureReason.CHECKSUM if response.size_bytes == size_bytes else FailureReason.PROTOCOL,
                    f"{address}: sent {response.size_bytes} bytes with xxh64 {response.checksum:#018x}; "
                    f"received {size_bytes} bytes with xxh64 {checksum:#018x}",
                )
            if staging is not None:
                staged = [m for m, v in zip(messages, direct) if v is None]
                await run_to_completion(_unpack_staged, store, staging, staged, dst)
        finally:
            if staging is not None and staging.device.type == "cpu":
                self.staging.give_back(staging)
        return TransferStats(size_bytes, time.perf_counter() - started, len(src), len(messages))

    async def _both(
        self, pair: Pair, address: str, receive: asyncio.Future[int], rpc: asyncio.Future[kv_codec.SendKVResult]
    ) -> tuple[int, kv_codec.SendKVResult]:
        """Wait for the receive and the control call. The first failure aborts the pair (so the
        other side fails fast) and is raised; the source's own explanation wins if it has one."""
        pair.num_users += 1
        try:
            both: set[asyncio.Future[Any]] = {receive, rpc}
            await asyncio.wait(both, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            self._drop(address, pair)
            rpc.cancel()
            raise
        finally:
            pair.num_users -= 1
        rpc_error = rpc.exception() if rpc.done() and not rpc.cancelled() else None
        receive_error = receive.exception() if receive.done() and not receive.cancelled() else None
        if rpc_error is None and receive_error is None:
            return receive.result(), rpc.result()
        self._drop(address, pair)
        rpc.cancel()
        receive.cancel()
        if isinstance(rpc_error, grpc.aio.AioRpcError):
            raise await self.channels.fail(rpc_error, address)
        raise rpc_error or receive_error  # type: ignore[misc]

    async def _receive(
        self, pair: Pair, targets: list[torch.Tensor], messages: list[Message], first_tag: int, deadline_s: float
    ) -> int:
        async with pair.lock:
            if pair.group is None:
                timeout_s = min(self.config.connect_timeout_s, deadline_s - time.monotonic())
                await asyncio.wrap_future(
                    self._executor.submit(pair.form, self._store().store, timeout_s, self.config.token)
                )
        receive = self._executor.submit(_receive_messages, pair, targets, messages, first_tag, deadline_s)
        return await asyncio.wrap_future(receive)

    def _pair_for(self, address: str, store: KVBlockStore) -> Pair:
        pair = self._pairs.get(address)
        if pair is None or pair.broken:
            pair = Pair(uuid.uuid4().hex, 1, self.config.bind_host, store.device)
            self._pairs[address] = pair
        return pair

    def _buffer(self, size_bytes: int, device: torch.device) -> torch.Tensor:
        """Where messages land: host staging for gloo, device memory for NCCL."""
        if device.type == "cpu":
            return self.staging.acquire(size_bytes)
        return torch.empty(size_bytes, dtype=torch.uint8, device=device)

    def _store(self) -> StoreHost:
        if self._store_host is None:
            self._store_host = StoreHost(self.config.bind_host, self.config.connect_timeout_s)
        return self._store_host

    def _drop(self, address: str, pair: Pair) -> None:
        if self._pairs.get(address) is pair:
            del self._pairs[address]
        pair.abort()

    async def release(self, handle: KVHandle, timeout_s: float) -> bool:
        return await release_remote(self.channels, handle, timeout_s)

    async def close(self) -> None:
        for pair in self._pairs.values():
            pair.abort()
        self._pairs.clear()
        for servicer in self._servicers:
            servicer.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.channels.close()
        self._store_host = None


def _slice(buffer: torch.Tensor | None, message: Message) -> torch.Tensor:
    assert buffer is not None
    return buffer[message.offset_bytes : message.offset_bytes + message.size_bytes]


def _receive_messages(
    pair: Pair, targets: list[torch.Tensor], messages: list[Message], first_tag: int, deadline_s: float
) -> int:
    """Worker thread: post every receive (message i into `targets[i]`), then hash each
    message as it lands, in plan order; return the xxh64 of the packed buffer."""
    works = [pair.post(target, first_tag + i, send=False) for i, target in enumerate(targets)]
    hasher = xxhash.xxh64()
    for target, work in zip(targets, works):
        pair.wait(work, deadline_s, "receive")
        hasher.update(host_bytes(target))
    return hasher.intdigest()


def _unpack_staged(store: KVBlockStore, staging: torch.Tensor, staged: list[Message], dst: tuple[int, ...]) -> None:
    """Worker thread, after the checksum matched: scatter the staged messages into `dst`."""
    if sum(m.size_bytes for m in staged) == len(staging):  # all of it: one unpack (a kernel on CUDA)
        store.unpack(staging, dst)
        return
    for m in staged:
        ids = dst[m.first_block : m.end_block]
        store.unpack_planes(_slice(staging, m), ids, m.first_plane, m.end_plane)
