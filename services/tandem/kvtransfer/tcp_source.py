"""Source side of the tcp transport: PullKVTcp on the prefill worker's gRPC server, and the KV
data listener that serves the tickets it hands out and the requests that come in band.

Lifecycle of one pull on P (the receiver's side: tcp_transport.py):
1. A receiver's first pull from P (it keeps no data connection to P yet): `PullKVTcp`
   (authenticated gRPC plane) refuses what PullKV refuses, with the same codes, then issues a
   ticket: the token the receiver chose (a random ticket id and secret; the source draws one
   for a request without), the request, and a deadline (the call's, at most `pull_timeout_s`).
   It answers the listener's address and the token. The data listener (tcp_listener.py),
   bound to `bind_host` only, hands a connection to a sender thread when bytes arrive on it.
   The first 48 bytes on a new connection must be a live ticket's token (secret compared in
   constant time), within TOKEN_TIMEOUT_S; anything else closes the connection with nothing
   sent, and counts. A ticket serves one pull; the receiver presents it after the call.
2. Every later pull on a connection that served one (the listener keeps it, and so does the
   receiver) comes in band: the request itself, as one frame (tcp_request.py: the
   PullKVRequest fields and the pull's timeout, its size capped before the body is read).
   The token that opened the connection authenticated it; the request is checked exactly as
   PullKVTcp checks its own (layout, block count, lease, secret, block ids and hashes), and a
   refusal is a header with PullKVTcp's code and message ("NOT_FOUND: no lease for ...");
   the deadline is the request's timeout, at most `pull_timeout_s`. A frame that is not one
   (or does not arrive within TOKEN_TIMEOUT_S) closes the connection and counts as refused,
   as does a token sent there. This saves a gRPC round trip per pull (a 64 MiB pull's fixed
   ~2.8 ms was mostly that call: the source started sending only once it had arrived).
   **It departs from DESIGN.md's "control on gRPC" rule:** the pull's control message rides
   on the data connection, which the gRPC plane authenticated once, by its ticket.
3. The sender checks the lease out (it may have ended since the ticket; then the header says
   why and nothing follows), sends the header, the blocks straight from the cache (CPU; on
   CUDA packed into pinned staging first) and the crc32c trailer (from the blocks' digests
   taken at grant, block_digests.py, when it has them), then unpins the lease. A refused pull
   closes its connection. A receiver that goes away or stalls mid-transfer ends the send with
   an error that is logged and counted (the send is bounded by the pull's deadline); the lease
   stays until ReleaseKV or expiry, as for every transport.
The servicer also serves PullKV and ReleaseKV (it extends the gRPC transport's).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from tandem.common import kv_codec
from tandem.kvtransfer import block_digests, tcp_listener, tcp_request, tcp_wire
from tandem.kvtransfer.base import KVTransferError
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import KVTransferServicer, lease_status
from tandem.kvtransfer.leases import HASH_MISMATCH_PREFIX, BlockHashMismatch, LeaseError, LeaseTable

log = logging.getLogger(__name__)

MAX_TICKETS = 1024  # tickets issued and not yet used or expired; more: RESOURCE_EXHAUSTED
# an in-band refusal's header status, by PullKVTcp's status code (channels.rpc_error's mapping)
_STATUS_OF = {
    grpc.StatusCode.NOT_FOUND: tcp_wire.Status.REFUSED,
    grpc.StatusCode.FAILED_PRECONDITION: tcp_wire.Status.LAYOUT_MISMATCH,  # or HASH_MISMATCH, by its message
    grpc.StatusCode.INVALID_ARGUMENT: tcp_wire.Status.INVALID,
}


@dataclass(frozen=True)
class _Ticket:
    request: kv_codec.PullKVRequest
    deadline_s: float  # time.monotonic()
    secret: bytes = field(repr=False)


@dataclass
class TcpSourceCounters:
    """What the listener saw; read by tests and logs."""

    served: int = 0  # pulls whose every byte and trailer went out
    refused_connections: int = 0  # no token in time, an unknown or expired ticket, a wrong secret, a malformed request
    failed_sends: int = 0  # the receiver went away or stalled mid-transfer


class TcpKVServicer(KVTransferServicer):
    """Owns its listening socket, its tickets and its sender threads."""

    def __init__(self, store: KVBlockStore, leases: LeaseTable, config: KVTransferConfig) -> None:
        super().__init__(store, leases, config)
        self.counters = TcpSourceCounters()
        self._tickets: dict[bytes, _Ticket] = {}  # by ticket id
        self._lock = threading.Lock()
        self._hashers = futures.ThreadPoolExecutor(config.max_inflight_sends, thread_name_prefix="kv-tcp-hash")
        # a CPU cache's leases are hashed once per block at grant: a pull then reads its blocks only to send them
        self.digests = leases.digests_for(store) if store.device.type == "cpu" else None
        self._listener = tcp_listener.DataListener(
            config.bind_host,
            config.tcp_port,
            self._serve,
            config.max_inflight_sends,
            lambda: self._count("refused_connections"),
        )
        self.address = self._listener.address
        self._request_cap = tcp_request.request_cap(config.max_blocks_per_pull)

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        handlers = super().handlers()
        handlers["PullKVTcp"] = grpc.unary_unary_rpc_method_handler(
            self.PullKVTcp,
            request_deserializer=kv_codec.pull_kv_request_from_bytes,
            response_serializer=kv_codec.tcp_ticket_to_bytes,
        )
        return handlers

    async def PullKVTcp(self, request: kv_codec.PullKVRequest, context: grpc.aio.ServicerContext) -> kv_codec.TcpTicket:
        token = request.tcp_token or secrets.token_bytes(kv_codec.TCP_TOKEN_BYTES)
        ticket_id, secret = token[: tcp_wire.TICKET_ID_BYTES], token[tcp_wire.TICKET_ID_BYTES :]
        refused = self.refusal(request)  # before a ticket exists; the sender checks the lease out again
        if refused is not None:
            await context.abort(*refused)
        bound_s = min(context.time_remaining() or self.config.pull_timeout_s, self.config.pull_timeout_s)
        with self._lock:
            self._drop_expired()
            refusal = (
                f"{MAX_TICKETS} KV tickets outstanding"
                if len(self._tickets) >= MAX_TICKETS
                else "tcp_token: its ticket id is in use"
                if ticket_id in self._tickets
                else ""
            )
            if not refusal:
                self._tickets[ticket_id] = _Ticket(request, time.monotonic() + bound_s, secret)
        if refusal:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        return kv_codec.TcpTicket(self.address, token, len(request.block_ids) * self.store.bytes_per_block)

    def refusal(self, request: kv_codec.PullKVRequest) -> tuple[grpc.StatusCode, str] | None:
        """Why a pull request is refused (status and message, as PullKV's), or None: its layout,
        its block count, and its lease (secret, block ids, block hashes)."""
        refused = self.admission(request.layout, request.block_ids)
        if refused is None:
            try:
                self.leases.check(request.request_id, request.block_ids, request.lease_secret, request.block_hashes)
            except LeaseError as exc:
                refused = lease_status(exc), str(exc)
        return refused

    def send_blocks(
        self,
        sock: socket.socket,
        views: list[memoryview],
        deadline_s: float,
        committed: block_digests.Digests | None = None,
    ) -> int:
        """Send the packed blocks and return their crc32c (sender thread, lease checked out).
        With `committed`, the blocks' digests taken at grant (block_digests.py), it is combined
        from those once the bytes are out, here, while the receiver drains its socket (in a
        thread beside the send, it held the GIL that the sender needs between its sends);
        without, the blocks are hashed in another thread during the send, which ends before
        this returns or raises. Tests override it to corrupt or cut the stream."""
        if committed is not None:
            tcp_wire.send_views(sock, views, deadline_s)
            return block_digests.combined(committed, self.store.plane_bytes(1))
        digest = self._hashers.submit(tcp_wire.checksum, views)
        try:
            tcp_wire.send_views(sock, views, deadline_s)
        finally:
            futures.wait([digest])  # it reads the leased blocks: done before the checkout ends
        return digest.result()

    # ---- sender threads (the listener: tcp_listener.py) ------------------------------------------
    def _serve(self, conn: socket.socket, fresh: bool) -> bool:
        """One pull on `conn`: its token (a `fresh` connection) or its request (a kept one),
        then the blocks. True if the connection stays in step for the next pull (the listener
        keeps it), False to close it."""
        peer = "receiver"
        try:
            peer = "{}:{}".format(*conn.getpeername()[:2])
            ticket = self._ticket_of(conn, peer) if fresh else self._request_of(conn, peer)
            if ticket is None:
                return False
            if fresh:
                tcp_wire.tune(conn)
            self._send(conn, ticket, peer)
            return True
        except (OSError, KVTransferError) as exc:
            self._count("failed_sends")
            log.warning("KV send to %s failed: %s", peer, exc)
            return False

    def _ticket_of(self, conn: socket.socket, peer: str) -> _Ticket | None:
        """The live ticket whose token a new connection presents, taken; else None (counted as
        refused, unless the connection closed before a byte)."""
        deadline_s = time.monotonic() + tcp_listener.TOKEN_TIMEOUT_S
        try:
            conn.settimeout(tcp_listener.TOKEN_TIMEOUT_S)
            first = conn.recv(1)
            if not first:
                return None  # closed before a byte: a receiver dropping a connection, not a wrong token
            token = first + tcp_wire.recv_exact(conn, kv_codec.TCP_TOKEN_BYTES - 1, deadline_s, peer)
        except (OSError, KVTransferError) as exc:
            self._count("refused_connections")
            log.warning("KV connection from %s refused: no token (%s)", peer, exc)
            return None
        ticket_id, secret = token[: tcp_wire.TICKET_ID_BYTES], token[tcp_wire.TICKET_ID_BYTES :]
        with self._lock:  # the receiver presents it after its PullKVTcp call returned the ticket
            self._drop_expired()
            ticket = self._tickets.get(ticket_id)
            expected = ticket.secret if ticket is not None else bytes(32)
            if hmac.compare_digest(expected, secret) and ticket is not None:
                del self._tickets[ticket_id]
                return ticket
        self._count("refused_connections")
        log.warning("KV connection from %s refused: not a live ticket's token", peer)
        return None

    def _request_of(self, conn: socket.socket, peer: str) -> _Ticket | None:
        """The in-band request that a kept connection sends next, checked, as a ticket; else
        None: the receiver closed the connection (not counted), the frame was malformed or
        late (counted as refused), or the request was refused (the header said why)."""
        deadline_s = time.monotonic() + tcp_listener.TOKEN_TIMEOUT_S
        try:
            conn.settimeout(tcp_listener.TOKEN_TIMEOUT_S)
            first = conn.recv(1)
            if not first:
                return None  # the receiver dropped its kept connection
            request, timeout_s = tcp_request.read_request(conn, first, deadline_s, peer, self._request_cap)
        except (OSError, KVTransferError, tcp_request.MalformedRequest) as exc:
            self._count("refused_connections")
            log.warning("KV connection from %s refused: not a pull request (%s)", peer, exc)
            return None
        refused = self.refusal(request)
        if refused is not None:
            code, message = refused
            status = _STATUS_OF.get(code, tcp_wire.Status.REFUSED)
            if status is tcp_wire.Status.LAYOUT_MISMATCH and message.startswith(HASH_MISMATCH_PREFIX):
                status = tcp_wire.Status.HASH_MISMATCH
            error = f"{code.name}: {message}"
            conn.sendall(tcp_wire.Header(status, 0, 0, tcp_wire.fingerprint_bytes(self.store.layout), error).encode())
            return None
        return _Ticket(request, time.monotonic() + min(timeout_s, self.config.pull_timeout_s), b"")

    def _send(self, conn: socket.socket, ticket: _Ticket, peer: str) -> None:
        request, store = ticket.request, self.store
        size_bytes = len(request.block_ids) * store.bytes_per_block
        fingerprint = tcp_wire.fingerprint_bytes(store.layout)
        try:
            with self.leases.checkout(
                request.request_id, request.block_ids, request.lease_secret, request.block_hashes
            ):
                staging, committed = None, None
                if store.device.type == "cpu":
                    views = tcp_wire.block_views(store, request.block_ids)
                    if self.digests is not None:  # None: none taken at grant (send_blocks hashes)
                        committed = self.digests.for_pull(request.request_id, request.block_ids)
                else:  # no socket I/O from device memory: pack into pinned host staging
                    staging = self.staging.acquire(size_bytes)
                    store.pack(request.block_ids, out=staging)
                    views = [staging.numpy().data]
                header = tcp_wire.Header(tcp_wire.Status.OK, len(request.block_ids), size_bytes, fingerprint)
                try:
                    conn.sendall(header.encode())
                    checksum = self.send_blocks(conn, views, ticket.deadline_s, committed)
                    conn.sendall(tcp_wire.TRAILER.pack(checksum))
                finally:  # the send ended either way: nothing reads the staging buffer any more
                    if staging is not None:
                        self.staging.give_back(staging)
        except LeaseError as exc:  # the lease ended or changed since the ticket
            status = tcp_wire.Status.HASH_MISMATCH if isinstance(exc, BlockHashMismatch) else tcp_wire.Status.REFUSED
            conn.sendall(tcp_wire.Header(status, 0, 0, fingerprint, str(exc)).encode())
            return
        self._count("served")
        self.num_pulls_served += 1
        self.bytes_served += size_bytes

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + 1)

    def _drop_expired(self) -> None:
        """Under the lock: forget tickets past their deadline."""
        now = time.monotonic()
        for ticket_id in [t for t, ticket in self._tickets.items() if ticket.deadline_s <= now]:
            del self._tickets[ticket_id]

    def close(self) -> None:
        """After the server stopped: stop listening; sends in progress end on their own."""
        super().close()
        self._listener.close()
        self._hashers.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._tickets.clear()
