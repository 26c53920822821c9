"""gRPC channels from the gateway to the workers: one channel per worker, reused by every
request (DESIGN.md section 6b), created on first use and closed once the worker has left the
registry; on a decode worker's channel, one multiplexed decode stream (gateway/mux.py), opened
on first use and again after it broke. Owned by the gateway's asyncio loop; not thread-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import grpc

from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.plane_auth import ClusterToken, aio_channel
from tandem.gateway.mux import MuxConnection

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


class WorkerClients:
    """`stub(address)` returns the Worker stub of a live worker's gRPC address. Every call
    presents `token`, the cluster token (None: an insecure plane)."""

    def __init__(self, token: ClusterToken | None = None) -> None:
        self._token = token
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.WorkerStub]] = {}
        self._streams: dict[str, MuxConnection] = {}

    def stub(self, address: str) -> pb_grpc.WorkerStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = aio_channel(address, self._token, CHANNEL_OPTIONS)
            entry = (channel, pb_grpc.WorkerStub(channel))
            self._channels[address] = entry
        return entry[1]

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel of `address` (the one `stub` uses), for the KVTransfer call the gateway
        makes: ReleaseKV of a handle it will not use."""
        self.stub(address)
        return self._channels[address][0]

    def decode_stream(self, address: str, max_buffered: int, full_timeout_s: float) -> MuxConnection:
        """The multiplexed decode stream to the worker at `address`: the open one, or a new one
        if there is none or it broke. Each request buffers at most `max_buffered` messages and
        is aborted when they stay full for `full_timeout_s`."""
        conn = self._streams.get(address)
        if conn is None or not conn.alive:
            conn = self._streams[address] = MuxConnection(self.stub(address), address, max_buffered, full_timeout_s)
        return conn

    async def prune(self, live_addresses: Iterable[str]) -> None:
        """Close the channels (and decode streams) of workers that are no longer registered."""
        live = set(live_addresses)
        for address in [a for a in self._streams if a not in live]:
            await self._streams.pop(address).close()
        for address in [a for a in self._channels if a not in live]:
            channel, _ = self._channels.pop(address)
            log.info("closing channel to %s (worker left the registry)", address)
            await channel.close(grace=None)

    async def close(self) -> None:
        await self.prune(())

    def __len__(self) -> int:
        return len(self._channels)
