"""The receiver's gRPC side shared by every transport: one channel per peer, error mapping,
and ReleaseKV.

A decode worker talks to many prefill workers and pulls from each many times, so it keeps one
grpc.aio channel per source address (DESIGN.md section 6b), owned by its transport and used
only from the transport's asyncio loop. A channel whose peer turned out to be unreachable is
dropped, so the next pull dials afresh instead of waiting out gRPC's reconnect backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import MappingProxyType
from typing import TypeVar

import grpc

from tandem.common import kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.common.plane_auth import ClusterToken, aio_channel
from tandem.kvtransfer.base import FailureReason, KVTransferError
from tandem.kvtransfer.config import MAX_CHUNK_BYTES
from tandem.kvtransfer.leases import HASH_MISMATCH_PREFIX

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

SERVICE = "tandem.v1.KVTransfer"
MAX_MESSAGE_BYTES = 2 * MAX_CHUNK_BYTES  # a 4 MiB chunk plus its header, with room to spare

# Options for the channels here: messages big enough for whole chunks, and no transparent
# retries (a pull is not idempotent from the caller's point of view: it has its own deadline
# and fallback).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)

# Options of a worker's gRPC server, which hosts the Worker and KVTransfer services (and of any
# server standing in for one, like the KV benchmark's source): messages big enough for whole
# chunks, and no port sharing with another process.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
)

_REASONS = MappingProxyType(
    {
        grpc.StatusCode.UNAVAILABLE: FailureReason.PEER_UNAVAILABLE,
        grpc.StatusCode.CANCELLED: FailureReason.PEER_UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED: FailureReason.TIMEOUT,
        grpc.StatusCode.FAILED_PRECONDITION: FailureReason.LAYOUT_MISMATCH,
        grpc.StatusCode.NOT_FOUND: FailureReason.REFUSED,
        grpc.StatusCode.RESOURCE_EXHAUSTED: FailureReason.REFUSED,
        grpc.StatusCode.PERMISSION_DENIED: FailureReason.REFUSED,
        grpc.StatusCode.UNAUTHENTICATED: FailureReason.REFUSED,
    }
)


def rpc_error(exc: grpc.aio.AioRpcError, address: str) -> KVTransferError:
    """A failed KVTransfer call as a KVTransferError (the source's message kept verbatim).
    FAILED_PRECONDITION is a layout mismatch, or, when the source says the block hashes differ
    (`leases.BlockHashMismatch`), a hash mismatch."""
    reason = _REASONS.get(exc.code(), FailureReason.PROTOCOL)
    if reason is FailureReason.LAYOUT_MISMATCH and (exc.details() or "").startswith(HASH_MISMATCH_PREFIX):
        reason = FailureReason.HASH_MISMATCH
    return KVTransferError(reason, f"{address}: {exc.code().name}: {exc.details()}")


class ChannelCache:
    """grpc.aio channels keyed by peer address; create, reuse, drop, close. One event loop.
    Every call presents `token` (the cluster token; None on an insecure plane)."""

    def __init__(
        self, options: tuple[tuple[str, int], ...] = CHANNEL_OPTIONS, token: ClusterToken | None = None
    ) -> None:
        self._options = list(options)
        self._token = token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = aio_channel(address, self._token, self._options)
            self._channels[address] = channel
        return channel

    async def drop(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace=None)

    def __len__(self) -> int:
        return len(self._channels)

    def unary(
        self,
        address: str,
        method: str,
        request_serializer: Callable[[T], bytes],
        response_deserializer: Callable[[bytes], R],
    ) -> grpc.aio.UnaryUnaryMultiCallable[T, R]:
        """A unary method of the KVTransfer service on the channel to `address`; the codec's
        functions (`request_serializer`, `response_deserializer`) translate the messages."""
        return self.get(address).unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=request_serializer,
            response_deserializer=response_deserializer,
        )

    async def fail(self, exc: grpc.aio.AioRpcError, address: str) -> KVTransferError:
        """Map a failed call; forget the channel if the peer is unreachable."""
        error = rpc_error(exc, address)
        if error.reason is FailureReason.PEER_UNAVAILABLE:
            await self.drop(address)
        return error


async def release_remote(channels: ChannelCache, handle: KVHandle, timeout_s: float) -> bool:
    """ReleaseKV on the handle's source. False (logged) if the source cannot be reached: its
    lease then expires on its own."""
    call = channels.unary(
        handle.source_address,
        "ReleaseKV",
        kv_codec.release_kv_request_to_bytes,
        kv_codec.release_kv_response_from_bytes,
    )
    try:
        released = await call(kv_codec.ReleaseKVRequest(handle.request_id, handle.lease_secret), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        error = await channels.fail(exc, handle.source_address)
        log.warning("ReleaseKV of %r failed (%s); the lease will expire", handle.request_id, error)
        return False
    return bool(released)
