"""The tcp transport's data connection: framing, and the send/receive loops over cache blocks.

A connection carries one pull at a time, receiver D to source P (P listens on its `bind_host`).
Its first pull starts with the token of a ticket (PullKVTcp); every later one, on the then
authenticated connection, with the request itself (tcp_source.py says why):

    D -> P   token           48 bytes: the ticket id (16) and secret (32) from PullKVTcp
      or     request         a PullKVRequest frame (tcp_request.py)
    P -> D   header          HEADER: magic b"TKV1", status, error length, number of blocks,
                             size in bytes, the source's layout fingerprint (8 bytes, xxh64)
    P -> D   error           `error length` bytes of UTF-8 (only when status is not OK; then EOF)
    P -> D   packed blocks   `size` bytes: the packed layout of block_store.py
    P -> D   trailer         4 bytes: crc32c of the packed blocks, little-endian

No pickle, no length taken on trust: P checks a request's frame and every field before use
(a malformed one closes the connection); D compares every header field with what it asked for
before a byte lands in its pool, and reads exactly the size it computed itself.

The packed blocks move straight between the caches: `block_views` lists the packed layout as
views of the cache, plane by plane, one view per run of consecutive block ids (no copy). The
loops move them in batches of at most PIECE_BYTES (one `sendmsg` / `recvmsg_into` of up to
MAX_IOV views). The source's trailer is combined from the per-block crc32c taken when the
lease was granted (block_digests.py), so a CPU source reads its blocks only to send them;
without those (a lease granted before the source served, a CUDA cache) it hashes the views
in another thread while it sends them. The receiver hashes each batch right after it landed,
while it is still in the CPU cache (its bytes keep arriving in the socket buffer meanwhile;
hashing in a second receiver thread instead measured no faster here).

The checksum is crc32c, one of the two DESIGN.md allows, from tandem.common.checksum: with
AVX-512 VPCLMULQDQ it hashes a batch that just landed at about 70 GB/s (the `crc32c`
package's crc32 instruction loop: 26 GB/s; xxh64: 10 GB/s). The receiver's hashing is the
work this transport adds to a plain copy over TCP (unpinned on a 2-core host, it ran at
0.66-0.74 of raw TCP with xxh64 and 0.74-0.84 with the package's crc32c; with this one, and
source and receiver on a core each, a 64 MiB pull takes about 20 ms where raw TCP's one
blocking `sendall` takes 27). Both crc32c functions release the GIL for large buffers.
"""

from __future__ import annotations

import enum
import socket
import struct
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from tandem.common.checksum import crc32c
from tandem.common.layout import KVLayout
from tandem.kvtransfer.base import FailureReason, KVTransferError
from tandem.kvtransfer.block_store import KVBlockStore

TICKET_ID_BYTES = 16
MAGIC = b"TKV1"
HEADER = struct.Struct("<4sHHIQ8s")  # magic, status, error length, num_blocks, size_bytes, fingerprint
TRAILER = struct.Struct("<I")  # crc32c of the packed blocks
MAX_ERROR_BYTES = 1024
PIECE_BYTES = 512 * 1024  # bytes per sendmsg/recvmsg_into, hashed while cache-hot
MAX_IOV = 64  # views per sendmsg/recvmsg_into (Linux allows 1024)


class Status(enum.IntEnum):
    """The header's status: OK, or why the source sends nothing."""

    OK = 0
    REFUSED = 1  # the ticket was good but the lease refused (ended, expired, blocks gone)
    HASH_MISMATCH = 2
    TIMEOUT = 3
    INTERNAL = 4
    LAYOUT_MISMATCH = 5  # an in-band request in another layout (FAILED_PRECONDITION on gRPC)
    INVALID = 6  # an in-band request for no blocks or too many (INVALID_ARGUMENT on gRPC)


_REASONS = MappingProxyType(
    {
        Status.REFUSED: FailureReason.REFUSED,
        Status.HASH_MISMATCH: FailureReason.HASH_MISMATCH,
        Status.TIMEOUT: FailureReason.TIMEOUT,
        Status.INTERNAL: FailureReason.PEER_UNAVAILABLE,
        Status.LAYOUT_MISMATCH: FailureReason.LAYOUT_MISMATCH,
        Status.INVALID: FailureReason.PROTOCOL,
    }
)


@dataclass(frozen=True)
class Header:
    status: Status
    num_blocks: int
    size_bytes: int
    fingerprint: bytes  # 8 bytes: KVLayout.fingerprint
    error: str = ""

    def encode(self) -> bytes:
        error = self.error.encode()[:MAX_ERROR_BYTES]
        head = HEADER.pack(MAGIC, self.status, len(error), self.num_blocks, self.size_bytes, self.fingerprint)
        return head + error


def fingerprint_bytes(layout: KVLayout) -> bytes:
    return bytes.fromhex(layout.fingerprint)


def tune(sock: socket.socket) -> None:
    """No Nagle delay for the small frames. The buffer sizes stay the kernel's to tune: a fixed
    SO_RCVBUF turns its autotuning off (and is capped by net.core.rmem_max)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def block_views(store: KVBlockStore, block_ids: Sequence[int]) -> list[memoryview]:
    """The packed layout of `block_ids` as uint8 views of a CPU cache, in order: per plane, one
    view per run of consecutive ids. The ids were checked by the caller (lease or `check_pull`).
    Slices of each plane's one memoryview (`_plane_views`): a torch view per run cost both
    ends of a 64 MiB pull 0.1-0.3 ms before their first byte."""
    runs: list[tuple[int, int]] = []  # (first block id, length)
    for block in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    size = store.plane_bytes(1)
    return [plane[first * size : (first + length) * size] for plane in _plane_views(store) for first, length in runs]


_PLANE_VIEWS: weakref.WeakKeyDictionary[KVBlockStore, list[memoryview]] = weakref.WeakKeyDictionary()


def _plane_views(store: KVBlockStore) -> list[memoryview]:
    """Every plane of a CPU cache as one uint8 memoryview (no copy), taken once per store: a
    store's caches are allocated once and never move."""
    views = _PLANE_VIEWS.get(store)
    if views is None:
        views = [store.run_view(0, store.num_blocks, plane).numpy().data for plane in range(store.num_planes)]
        _PLANE_VIEWS[store] = views
    return views


def batches(views: Sequence[memoryview]) -> Iterator[list[memoryview]]:
    """`views` cut into lists of at most PIECE_BYTES bytes and MAX_IOV views, in order."""
    batch: list[memoryview] = []
    size = 0
    for view in views:
        for start in range(0, len(view), PIECE_BYTES):
            piece = view[start : start + PIECE_BYTES]
            if batch and (size + len(piece) > PIECE_BYTES or len(batch) == MAX_IOV):
                yield batch
                batch, size = [], 0
            batch.append(piece)
            size += len(piece)
    if batch:
        yield batch


def checksum(views: Sequence[memoryview]) -> int:
    """crc32c of `views` in order (it releases the GIL: it runs beside a send)."""
    value = 0
    for view in views:
        value = crc32c(view, value)
    return value


def send_views(sock: socket.socket, views: Sequence[memoryview], deadline_s: float) -> None:
    """Send `views` in order, in batches; OSError (TimeoutError past the deadline) if it fails."""
    for batch in batches(views):
        _set_deadline(sock, deadline_s)
        while batch:
            sent = sock.sendmsg(batch)
            batch = _advance(batch, sent)


def recv_views(sock: socket.socket, views: Sequence[memoryview], deadline_s: float, peer: str) -> int:
    """Fill `views` in order from `sock`, hashing each batch once it landed; return the crc32c.
    KVTransferError if the peer closes early (PEER_UNAVAILABLE) or the deadline passes."""
    value = 0
    received = 0
    for batch in batches(views):
        pending = batch
        _set_deadline(sock, deadline_s)
        while pending:
            got = _recv_into(sock, pending, peer)
            if got == 0:
                raise KVTransferError(
                    FailureReason.PEER_UNAVAILABLE,
                    f"{peer}: the source closed the KV connection after {received} bytes (short read)",
                )
            received += got
            pending = _advance(pending, got)
        for piece in batch:
            value = crc32c(piece, value)
    return value


def recv_exact(sock: socket.socket, size: int, deadline_s: float, peer: str) -> bytes:
    """Exactly `size` bytes (a frame, not KV), or KVTransferError as `recv_views`."""
    buffer = bytearray(size)
    recv_views(sock, [memoryview(buffer)], deadline_s, peer)
    return bytes(buffer)


def read_header(sock: socket.socket, deadline_s: float, peer: str) -> Header:
    """The source's header, with its error text when it refuses; PROTOCOL if it is malformed."""
    magic, status, error_len, num_blocks, size_bytes, fingerprint = HEADER.unpack(
        recv_exact(sock, HEADER.size, deadline_s, peer)
    )
    if magic != MAGIC or status not in Status._value2member_map_ or error_len > MAX_ERROR_BYTES:
        raise KVTransferError(
            FailureReason.PROTOCOL, f"{peer}: malformed KV header (magic {magic!r}, status {status}, error {error_len})"
        )
    error = recv_exact(sock, error_len, deadline_s, peer).decode(errors="replace") if error_len else ""
    return Header(Status(status), num_blocks, size_bytes, fingerprint, error)


def check_header(header: Header, num_blocks: int, size_bytes: int, layout: KVLayout, peer: str) -> None:
    """Raise unless the source sends exactly what the receiver asked for, in its layout."""
    if header.status is not Status.OK:
        raise KVTransferError(_REASONS[header.status], f"{peer}: {header.error}")
    if header.fingerprint != fingerprint_bytes(layout):
        raise KVTransferError(
            FailureReason.LAYOUT_MISMATCH,
            f"{peer}: the source's layout fingerprint {header.fingerprint.hex()} is not ours ({layout.fingerprint})",
        )
    if (header.num_blocks, header.size_bytes) != (num_blocks, size_bytes):
        raise KVTransferError(
            FailureReason.PROTOCOL,
            f"{peer}: the source sends {header.num_blocks} blocks in {header.size_bytes} bytes; "
            f"we asked for {num_blocks} blocks in {size_bytes} bytes",
        )


def _recv_into(sock: socket.socket, buffers: list[memoryview], peer: str) -> int:
    try:
        return sock.recvmsg_into(buffers)[0]
    except TimeoutError:
        raise KVTransferError(FailureReason.TIMEOUT, f"{peer}: the KV data did not arrive in time") from None
    except OSError as exc:
        raise KVTransferError(FailureReason.PEER_UNAVAILABLE, f"{peer}: KV connection failed: {exc}") from None


def _set_deadline(sock: socket.socket, deadline_s: float) -> None:
    remaining_s = deadline_s - time.monotonic()
    if remaining_s <= 0:
        raise KVTransferError(FailureReason.TIMEOUT, "the KV transfer ran past its deadline")
    sock.settimeout(remaining_s)


def _advance(buffers: list[memoryview], done: int) -> list[memoryview]:
    """What is left of `buffers` after the first `done` bytes went."""
    for i, buffer in enumerate(buffers):
        if done < len(buffer):
            return [buffer[done:], *buffers[i + 1 :]]
        done -= len(buffer)
    return []
