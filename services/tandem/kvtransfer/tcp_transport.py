"""The tcp KV transport: control on the authenticated gRPC plane, the bytes on a dedicated TCP
connection from the source's cache blocks into the receiver's.

Lifecycle of one pull (decode worker D pulls from prefill worker P; P's side: tcp_source.py,
the connection's framing: tcp_wire.py):
1. D checks its arguments (`check_pull`; its caller checked the handle's layout), draws a
   one-time token and calls `P.PullKVTcp` with the PullKV fields and the token, under the
   pull's deadline. P refuses exactly as PullKV does (that error is the pull's), or answers
   the ticket: its data listener's address, the token and the size.
2. In a thread, D presents the token on a data connection to that address (one it kept from
   an earlier pull, tcp_kept.py, else a new one; on a kept one it does not wait for the
   answer of step 1), reads the header and checks every field of it (status, block count,
   size, layout fingerprint) against what it asked for before any byte lands in its pool.
3. D receives the packed blocks straight into its destination blocks (CPU: one view per run
   of consecutive ids per plane; CUDA: into pinned host staging), hashing each batch as it
   lands, then reads the source's crc32c and compares. A mismatch is CHECKSUM; the source
   closing early is PEER_UNAVAILABLE ("short read"); the deadline passing is TIMEOUT.
   As with the torch transport, a failed pull may have written some destination blocks:
   they hold no KV anyone may use, and the caller gives them back uncached (base.py). A
   cancelled pull shuts the socket down and waits for the thread, so nothing is written
   after `pull` returns or raises.
4. D then calls ReleaseKV on the gRPC plane, as for every transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time

import grpc
import torch

from tandem.common import kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.kvtransfer import tcp_wire
from tandem.kvtransfer.base import CheckedPull, FailureReason, KVTransferError, TransferStats, run_to_completion
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import ChannelCache, release_remote
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.staging import StagingPool
from tandem.kvtransfer.tcp_kept import KeptConnections
from tandem.kvtransfer.tcp_source import TcpKVServicer
from tandem.kvtransfer.torch_pairs import parse_address


class TcpTransport(CheckedPull):
    """Receiver side; one per decode worker, used from its asyncio loop. Owns its channels and
    its staging buffers (CUDA caches only) and its kept data connections."""

    name = "tcp"

    def __init__(self, config: KVTransferConfig) -> None:
        self.config = config
        self.channels = ChannelCache(token=config.token)
        self.staging = StagingPool(config.max_staging_bytes, pin_memory=torch.cuda.is_available())
        self.kept = KeptConnections()
        self._data_addresses: dict[str, str] = {}  # source gRPC address -> its data listener's
        self._servicers: list[TcpKVServicer] = []

    def add_source(self, server: grpc.aio.Server, store: KVBlockStore, leases: LeaseTable) -> None:
        servicer = TcpKVServicer(store, leases, self.config)
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
        call = self.channels.unary(
            address, "PullKVTcp", kv_codec.pull_kv_request_to_bytes, kv_codec.tcp_ticket_from_bytes
        )
        token = secrets.token_bytes(kv_codec.TCP_TOKEN_BYTES)
        request = kv_codec.PullKVRequest(
            handle.request_id, src, store.layout.describe(), 0, handle.lease_secret, hashes, tcp_token=token
        )
        size_bytes = len(src) * store.bytes_per_block
        rpc = asyncio.ensure_future(call(request, timeout=timeout_s))
        # With a kept connection to this source, the token goes out at once, beside the call.
        known = self._data_addresses.get(address)
        early = None
        if known is not None and known in self.kept:
            early = self._receive(kv_codec.TcpTicket(known, token, size_bytes), store, dst, deadline_s)
        try:
            ticket = await rpc
        except grpc.aio.AioRpcError as exc:
            await _stop(early)
            raise await self.channels.fail(exc, address) from None
        except BaseException:
            rpc.cancel()
            await _stop(early)
            raise
        expected = kv_codec.TcpTicket(ticket.address if early is None else early[0].ticket.address, token, size_bytes)
        if ticket != expected:
            await _stop(early)
            raise KVTransferError(
                FailureReason.PROTOCOL,
                f"{address}: ticket for {ticket.size_bytes} bytes at {ticket.address[:80]}, expected "
                f"{size_bytes} bytes{'' if early is None else ' at ' + expected.address} and our token",
            )
        self._data_addresses[address] = ticket.address
        if early is None:
            early = self._receive(ticket, store, dst, deadline_s)
        num_views = await early[1]
        return TransferStats(size_bytes, time.perf_counter() - started, len(src), num_views, transport=self.name)

    def _receive(
        self, ticket: kv_codec.TcpTicket, store: KVBlockStore, dst: tuple[int, ...], deadline_s: float
    ) -> tuple[_Receive, asyncio.Future[int]]:
        """Start receiving the pull of `ticket` in a thread (KVTransferError if its address is malformed)."""
        try:
            data_address = parse_address(ticket.address)
        except ValueError as exc:
            raise KVTransferError(FailureReason.PROTOCOL, f"ticket address: {exc}") from None
        receive = _Receive(self.kept, self.staging, ticket, data_address, store, dst, deadline_s)
        return receive, asyncio.ensure_future(run_to_completion(receive.run, on_cancel=receive.abort))

    async def release(self, handle: KVHandle, timeout_s: float) -> bool:
        return await release_remote(self.channels, handle, timeout_s)

    async def close(self) -> None:
        for servicer in self._servicers:
            servicer.close()
        self.kept.close()
        await self.channels.close()


class _Receive:
    """One pull's data connection, run in a worker thread; `abort` (any thread) ends it."""

    def __init__(
        self,
        kept: KeptConnections,
        staging: StagingPool,
        ticket: kv_codec.TcpTicket,
        data_address: tuple[str, int],
        store: KVBlockStore,
        dst: tuple[int, ...],
        deadline_s: float,
    ) -> None:
        self.kept, self.staging, self.ticket, self.data_address = kept, staging, ticket, data_address
        self.store, self.dst, self.deadline_s = store, dst, deadline_s
        self.peer = ticket.address
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def run(self) -> int:
        """Connect, check the header, receive into the blocks, verify; return the number of
        views received into. KVTransferError on any failure."""
        try:
            return self._run()
        except TimeoutError:
            raise KVTransferError(
                FailureReason.TIMEOUT, f"{self.peer}: the KV transfer ran past its deadline"
            ) from None
        except OSError as exc:
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"{self.peer}: KV connection failed: {exc}") from None

    def _run(self) -> int:
        sock, reused = self._open()
        keep = False
        try:
            try:
                header = self._start(sock)
            except (KVTransferError, OSError) as exc:
                if not reused or not _closed_by_peer(exc):
                    raise
                sock.close()  # a kept connection that the source closed meanwhile: once more, anew
                sock, reused = self._open(fresh=True)
                header = self._start(sock)
            tcp_wire.check_header(header, len(self.dst), self.ticket.size_bytes, self.store.layout, self.peer)
            if self.store.device.type == "cpu":  # straight into the destination blocks
                views = tcp_wire.block_views(self.store, self.dst)
                self._receive(sock, views)
                keep = True
                return len(views)
            staging = self.staging.acquire(self.ticket.size_bytes)
            try:
                self._receive(sock, [staging.numpy().data])
                self.store.unpack(staging, self.dst)  # verified: only now into the (device) blocks
            finally:
                self.staging.give_back(staging)
            keep = True
            return 1
        finally:
            if keep:
                self.kept.give(self.ticket.address, sock)
            else:
                sock.close()

    def _start(self, sock: socket.socket) -> tcp_wire.Header:
        sock.sendall(self.ticket.token)
        return tcp_wire.read_header(sock, self.deadline_s, self.peer)

    def _receive(self, sock: socket.socket, views: list[memoryview]) -> None:
        got = tcp_wire.recv_views(sock, views, self.deadline_s, self.peer)
        (sent,) = tcp_wire.TRAILER.unpack(tcp_wire.recv_exact(sock, tcp_wire.TRAILER.size, self.deadline_s, self.peer))
        if got != sent:
            raise KVTransferError(
                FailureReason.CHECKSUM,
                f"{self.peer}: received {self.ticket.size_bytes} bytes with crc32c {got:#010x}; "
                f"the source sent crc32c {sent:#010x}",
            )

    def _open(self, fresh: bool = False) -> tuple[socket.socket, bool]:
        """A kept connection to the source's listener (unless `fresh`), else a new one; and
        whether it was kept. Registered for `abort`."""
        self._check_aborted()
        sock = None if fresh else self.kept.take(self.ticket.address)
        reused = sock is not None
        if sock is None:
            sock = self._connect()
        with self._lock:
            if self._aborted:
                sock.close()
            else:
                self._sock = sock
        self._check_aborted()
        return sock, reused

    def _check_aborted(self) -> None:
        if self._aborted:
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"{self.peer}: the pull was stopped")

    def _connect(self) -> socket.socket:
        timeout_s = self.deadline_s - time.monotonic()
        try:
            if timeout_s <= 0:
                raise TimeoutError("no time left")
            sock = socket.create_connection(self.data_address, timeout=timeout_s)
        except TimeoutError:
            raise KVTransferError(FailureReason.TIMEOUT, f"{self.peer}: no KV connection in time") from None
        except OSError as exc:
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"{self.peer}: cannot connect: {exc}") from None
        try:
            tcp_wire.tune(sock)
        except OSError as exc:
            sock.close()
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"{self.peer}: {exc}") from None
        return sock

    def abort(self) -> None:
        """Make `run` end now (the caller was cancelled): shut the connection down."""
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _closed_by_peer(exc: Exception) -> bool:
    """Whether a failure to start a pull on a kept connection says the source had closed it
    (then the pull goes once more on a new connection; a stalled source is no such case)."""
    if isinstance(exc, KVTransferError):
        return exc.reason is FailureReason.PEER_UNAVAILABLE
    return not isinstance(exc, TimeoutError)


async def _stop(started: tuple[_Receive, asyncio.Future[int]] | None) -> None:
    """End a receive started beside a PullKVTcp call that failed; wait until its thread ended."""
    if started is None:
        return
    receive, task = started
    receive.abort()
    while not task.done():  # even if we are cancelled meanwhile: nothing is written after we return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: the caller raises its own error
