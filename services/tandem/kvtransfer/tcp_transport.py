"""The tcp KV transport: the bytes on a dedicated TCP connection from the source's cache
blocks into the receiver's; a first pull's control on the authenticated gRPC plane, later ones
in band on the connection it authenticated.

Lifecycle of one pull (decode worker D pulls from prefill worker P; P's side: tcp_source.py,
the connection's framing: tcp_wire.py, tcp_request.py):
1. D checks its arguments (`check_pull`; its caller checked the handle's layout).
2. If D keeps a data connection to P's listener (tcp_kept.py: one that carried a pull from P
   before, so one a ticket authenticated), it writes the pull request on it as one frame, with
   the time left to the pull's deadline, and reads P's answer there: no gRPC call. If P had
   closed that connection before it answered (idle too long), D goes on with step 3.
   **This departs from DESIGN.md's "control on gRPC" rule** (tcp_source.py says why).
3. Else D draws a one-time token and calls `P.PullKVTcp` with the PullKV fields and the token,
   under the pull's deadline. P refuses exactly as PullKV does (that error is the pull's), or
   answers the ticket: its data listener's address, the token and the size. D presents the
   token on a new data connection to that address.
4. Either way, in a thread, D reads the header and checks every field of it (status, block
   count, size, layout fingerprint) against what it asked for before any byte lands in its
   pool; a refusal in band says what PullKVTcp would ("NOT_FOUND: no lease for ..."), and the
   connection is closed.
5. D receives the packed blocks straight into its destination blocks (CPU: one view per run
   of consecutive ids per plane; CUDA: into pinned host staging), hashing each batch as it
   lands, then reads the source's crc32c and compares. A mismatch is CHECKSUM; the source
   closing early is PEER_UNAVAILABLE ("short read"); the deadline passing is TIMEOUT.
   As with the torch transport, a failed pull may have written some destination blocks:
   they hold no KV anyone may use, and the caller gives them back uncached (base.py). A
   cancelled pull shuts the socket down and waits for the thread, so nothing is written
   after `pull` returns or raises. A pull that ended well keeps its connection for the next.
6. D then calls ReleaseKV on the gRPC plane, as for every transport.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import threading
import time

import grpc
import torch

from tandem.common import kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.kvtransfer import tcp_request, tcp_wire
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
        request = kv_codec.PullKVRequest(
            handle.request_id, src, store.layout.describe(), 0, handle.lease_secret, hashes
        )
        size_bytes = len(src) * store.bytes_per_block
        data_address = self._data_addresses.get(address)
        kept = self.kept.take(data_address) if data_address is not None else None
        if kept is not None and data_address is not None:  # in band, on the connection a ticket authenticated
            frame = tcp_request.encode_request(request, deadline_s - time.monotonic())
            try:
                num_views = await self._receive(data_address, frame, size_bytes, store, dst, deadline_s, kept)
                return TransferStats(size_bytes, time.perf_counter() - started, len(src), num_views, self.name)
            except _Stale:
                pass  # the source had closed it: once more, with a ticket
        call = self.channels.unary(
            address, "PullKVTcp", kv_codec.pull_kv_request_to_bytes, kv_codec.tcp_ticket_from_bytes
        )
        token = secrets.token_bytes(kv_codec.TCP_TOKEN_BYTES)
        try:
            ticket = await call(
                dataclasses.replace(request, tcp_token=token), timeout=max(deadline_s - time.monotonic(), 1e-3)
            )
        except grpc.aio.AioRpcError as exc:
            raise await self.channels.fail(exc, address) from None
        if (ticket.token, ticket.size_bytes) != (token, size_bytes):
            raise KVTransferError(
                FailureReason.PROTOCOL,
                f"{address}: ticket for {ticket.size_bytes} bytes, expected {size_bytes} bytes and our token",
            )
        num_views = await self._receive(ticket.address, token, size_bytes, store, dst, deadline_s)
        self._data_addresses[address] = ticket.address
        return TransferStats(size_bytes, time.perf_counter() - started, len(src), num_views, self.name)

    async def _receive(
        self,
        data_address: str,
        first: bytes,
        size_bytes: int,
        store: KVBlockStore,
        dst: tuple[int, ...],
        deadline_s: float,
        kept: socket.socket | None = None,
    ) -> int:
        """Send `first` (a token on a new connection, or a request on `kept`) to the listener at
        `data_address` and receive the pull into `dst` in a thread; the number of views
        received into. KVTransferError if it fails (PROTOCOL if the address is malformed),
        _Stale if `kept` turns out closed by the source before it answered."""
        try:
            parsed = parse_address(data_address)
        except ValueError as exc:
            if kept is not None:
                kept.close()
            raise KVTransferError(FailureReason.PROTOCOL, f"ticket address: {exc}") from None
        receive = _Receive(self.kept, self.staging, data_address, parsed, first, size_bytes, store, dst, deadline_s)
        return await run_to_completion(receive.run, kept, on_cancel=receive.abort)

    async def release(self, handle: KVHandle, timeout_s: float) -> bool:
        return await release_remote(self.channels, handle, timeout_s)

    async def close(self) -> None:
        for servicer in self._servicers:
            servicer.close()
        self.kept.close()
        await self.channels.close()


class _Stale(Exception):
    """A kept connection that the source had closed before it answered (idle too long)."""


class _Receive:
    """One pull's data connection, run in a worker thread; `abort` (any thread) ends it."""

    def __init__(
        self,
        kept: KeptConnections,
        staging: StagingPool,
        address: str,
        data_address: tuple[str, int],
        first: bytes,
        size_bytes: int,
        store: KVBlockStore,
        dst: tuple[int, ...],
        deadline_s: float,
    ) -> None:
        self.kept, self.staging, self.address, self.data_address = kept, staging, address, data_address
        self.first, self.size_bytes = first, size_bytes
        self.store, self.dst, self.deadline_s = store, dst, deadline_s
        self.peer = address
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def run(self, kept: socket.socket | None) -> int:
        """Send the first bytes on `kept` or a new connection, check the header, receive into
        the blocks, verify; return the number of views received into. KVTransferError on any
        failure; _Stale if `kept` was closed by the source before it answered."""
        try:
            return self._run(kept)
        except TimeoutError:
            raise KVTransferError(
                FailureReason.TIMEOUT, f"{self.peer}: the KV transfer ran past its deadline"
            ) from None
        except OSError as exc:
            raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"{self.peer}: KV connection failed: {exc}") from None

    def _run(self, kept: socket.socket | None) -> int:
        sock = self._open(kept)
        keep = False
        try:
            try:
                sock.sendall(self.first)
                header = tcp_wire.read_header(sock, self.deadline_s, self.peer)
            except (KVTransferError, OSError) as exc:
                if kept is not None and _closed_by_peer(exc) and not self._aborted:
                    raise _Stale() from None
                raise
            tcp_wire.check_header(header, len(self.dst), self.size_bytes, self.store.layout, self.peer)
            if self.store.device.type == "cpu":  # straight into the destination blocks
                views = tcp_wire.block_views(self.store, self.dst)
                self._receive(sock, views)
                keep = True
                return len(views)
            staging = self.staging.acquire(self.size_bytes)
            try:
                self._receive(sock, [staging.numpy().data])
                self.store.unpack(staging, self.dst)  # verified: only now into the (device) blocks
            finally:
                self.staging.give_back(staging)
            keep = True
            return 1
        finally:
            if keep:
                self.kept.give(self.address, sock)
            else:
                sock.close()

    def _receive(self, sock: socket.socket, views: list[memoryview]) -> None:
        got = tcp_wire.recv_views(sock, views, self.deadline_s, self.peer)
        (sent,) = tcp_wire.TRAILER.unpack(tcp_wire.recv_exact(sock, tcp_wire.TRAILER.size, self.deadline_s, self.peer))
        if got != sent:
            raise KVTransferError(
                FailureReason.CHECKSUM,
                f"{self.peer}: received {self.size_bytes} bytes with crc32c {got:#010x}; "
                f"the source sent crc32c {sent:#010x}",
            )

    def _open(self, kept: socket.socket | None) -> socket.socket:
        """`kept`, else a new connection to the source's listener; registered for `abort`."""
        if self._aborted and kept is not None:
            kept.close()
        self._check_aborted()
        sock = kept if kept is not None else self._connect()
        with self._lock:
            if self._aborted:
                sock.close()
            else:
                self._sock = sock
        self._check_aborted()
        return sock

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
    (then the pull goes once more, with a ticket; a stalled source is no such case)."""
    if isinstance(exc, KVTransferError):
        return exc.reason is FailureReason.PEER_UNAVAILABLE
    return not isinstance(exc, TimeoutError)
