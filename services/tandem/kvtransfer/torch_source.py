"""Source side of the torch KV transport: SendKV on the prefill worker's gRPC server.

See services/tandem/kvtransfer/torch_transport.py for the lifecycle of a pull. The servicer also
serves PullKV and ReleaseKV (it extends the gRPC transport's), so a receiver configured with
either transport can pull from a source configured with this one.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import grpc
import torch
import xxhash

from tandem.common import kv_codec
from tandem.kvtransfer.base import FailureReason, KVTransferError
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import KVTransferServicer, lease_status
from tandem.kvtransfer.leases import LeaseError, LeaseTable
from tandem.kvtransfer.torch_pairs import Pair, host_bytes, parse_address
from tandem.kvtransfer.torch_plan import cache_views, plan_messages

_PAIR_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
_STATUS = MappingProxyType(
    {
        FailureReason.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
        FailureReason.REFUSED: grpc.StatusCode.NOT_FOUND,
    }
)


class TorchKVServicer(KVTransferServicer):
    """Source side: PullKV and ReleaseKV as in the gRPC transport, plus SendKV. Owns its pairs
    (by pair id, least recently used torn down beyond `max_pairs`) and its thread pool."""

    def __init__(self, store: KVBlockStore, leases: LeaseTable, config: KVTransferConfig) -> None:
        super().__init__(store, leases, config)
        self._send_executor = ThreadPoolExecutor(config.max_inflight_sends + 1, thread_name_prefix="kv-send")
        self._pairs: OrderedDict[tuple[str, str], Pair] = OrderedDict()  # by (store address, pair id)
        self._num_inflight = 0

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        handlers = super().handlers()
        handlers["SendKV"] = grpc.unary_unary_rpc_method_handler(
            self.SendKV,
            request_deserializer=kv_codec.send_kv_request_from_bytes,
            response_serializer=kv_codec.send_kv_result_to_bytes,
        )
        return handlers

    async def SendKV(self, request: kv_codec.SendKVRequest, context: grpc.aio.ServicerContext) -> kv_codec.SendKVResult:
        block_ids = request.block_ids
        await self.admit(context, request.layout, block_ids)
        await self._check_pair_request(request, context)
        try:
            # before joining or allocating anything
            self.leases.check(request.request_id, block_ids, request.lease_secret, request.block_hashes)
        except LeaseError as exc:
            await context.abort(lease_status(exc), str(exc))
        if self._num_inflight >= self.config.max_inflight_sends:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self._num_inflight} KV sends in flight")
        bound_s = min(context.time_remaining() or self.config.pull_timeout_s, self.config.pull_timeout_s)
        deadline_s = time.monotonic() + bound_s
        pair = self._pair(request.pair_id, request.store_address)
        self._num_inflight += 1
        try:
            await self._form_once(pair, request.store_address, deadline_s)
            send = self._send_executor.submit(self._send, pair, request, deadline_s)
            checksum = await asyncio.wrap_future(send)
        except LeaseError as exc:  # the lease ended since the check
            self._drop(pair)
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except KVTransferError as exc:
            self._drop(pair)
            await context.abort(_STATUS.get(exc.reason, grpc.StatusCode.UNAVAILABLE), str(exc))
        except asyncio.CancelledError:  # the receiver gave up: its side of the pair is gone too
            self._drop(pair)
            raise
        finally:
            self._num_inflight -= 1
            pair.num_users -= 1
        return kv_codec.SendKVResult(size_bytes=len(block_ids) * self.store.bytes_per_block, checksum=checksum)

    async def _check_pair_request(self, request: kv_codec.SendKVRequest, context: grpc.aio.ServicerContext) -> None:
        """The store address comes from a peer: it must parse and be on the peer's own host,
        so that no caller can make this worker connect elsewhere."""
        if not _PAIR_ID.match(request.pair_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed pair id {request.pair_id[:80]!r}")
        try:
            host, _ = parse_address(request.store_address)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"store_address: {exc}")
        peer_host = _peer_host(context.peer())
        if peer_host is not None and host != peer_host:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"store host {host} is not the caller's host {peer_host}"
            )

    def _pair(self, pair_id: str, store_address: str) -> Pair:
        """The pair named by the receiver, created (not yet formed) if new; one more user.
        A receiver keeps one pair per source, so a new pair id from the same store replaces
        (tears down) the pairs it had before."""
        key = (store_address, pair_id)
        pair = self._pairs.get(key)
        if pair is None or pair.broken:
            for old in [p for p in self._pairs.values() if p.peer_store == store_address]:
                self._drop(old)
            self._evict_idle()
            pair = Pair(pair_id, 0, self.config.bind_host, self.store.device, peer_store=store_address)
            self._pairs[key] = pair
        self._pairs.move_to_end(key)
        pair.num_users += 1
        pair.last_used_s = time.monotonic()
        return pair

    async def _form_once(self, pair: Pair, store_address: str, deadline_s: float) -> None:
        async with pair.lock:
            if pair.group is None:
                timeout_s = min(self.config.connect_timeout_s, deadline_s - time.monotonic())
                await asyncio.wrap_future(self._send_executor.submit(self._form, pair, store_address, timeout_s))

    def _form(self, pair: Pair, store_address: str, timeout_s: float) -> None:
        pair.form(pair.join_store(store_address, timeout_s), timeout_s, self.config.token)

    def _send(self, pair: Pair, request: kv_codec.SendKVRequest, deadline_s: float) -> int:
        """Worker thread: send every message of the plan (torch_plan.py), holding the lease
        checked out for as long as the sends read the cache. Returns the xxh64 of the packed
        buffer (the messages in order)."""
        block_ids, first_tag = request.block_ids, request.tag
        messages = plan_messages(len(block_ids), self.store, request.segment_ends)
        staging: torch.Tensor | None = None
        hasher = xxhash.xxh64()
        with self.leases.checkout(request.request_id, block_ids, request.lease_secret, request.block_hashes):
            views = cache_views(messages, self.store, block_ids)  # from the cache where a run
            if any(view is None for view in views):
                staging = self._send_buffer(len(block_ids) * self.store.bytes_per_block)
            works, sent = [], []  # `sent` keeps every tensor alive until its send completes
            for i, (message, view) in enumerate(zip(messages, views)):
                if view is None:
                    assert staging is not None
                    view = staging[message.offset_bytes : message.offset_bytes + message.size_bytes]
                    ids = block_ids[message.first_block : message.end_block]
                    self.store.pack_planes(ids, message.first_plane, message.end_plane, view)
                sent.append(self.wire_view(view, i))
                works.append(pair.post(sent[-1], first_tag + i, send=True))
                hasher.update(host_bytes(view))  # overlaps with the send
            for work in works:
                pair.wait(work, deadline_s, "send")
        if staging is not None and staging.device.type == "cpu":
            self.staging.give_back(staging)
        return hasher.intdigest()

    def _send_buffer(self, size_bytes: int) -> torch.Tensor:
        """Where packed messages are built: host staging for gloo, device memory for NCCL."""
        if self.store.device.type == "cpu":
            return self.staging.acquire(size_bytes)
        return torch.empty(size_bytes, dtype=torch.uint8, device=self.store.device)

    def wire_view(self, view: torch.Tensor, index: int) -> torch.Tensor:
        """The tensor sent as message `index` (worker thread). Tests override it to corrupt one."""
        return view

    def _evict_idle(self) -> None:
        """Make room for one more pair: tear down the least recently used idle ones."""
        for key, pair in list(self._pairs.items()):
            if len(self._pairs) < self.config.max_pairs:
                return
            if pair.num_users == 0 or pair.broken:
                del self._pairs[key]
                pair.abort()

    def _drop(self, pair: Pair) -> None:
        key = (pair.peer_store, pair.pair_id)
        if self._pairs.get(key) is pair:
            del self._pairs[key]
        pair.abort()

    def close(self) -> None:
        super().close()
        for pair in self._pairs.values():
            pair.abort()
        self._pairs.clear()
        self._send_executor.shutdown(wait=False, cancel_futures=True)


def _peer_host(peer: str) -> str | None:
    """ "ipv4:1.2.3.4:5678" / "ipv6:[::1]:5678" -> host; None for other transports."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    try:
        return parse_address(rest)[0]
    except ValueError:
        return None
