"""The KV hand-off on the wire: the KV handle, the KVTransfer service (PullKV, ReleaseKV,
SendKV) and the KV chunks, which have a zero-copy framing of their own (see "KV chunks").

With `codec.py`, the only code that builds or reads a protobuf object. Every function applied
to what a peer sent validates it here, with bounded sizes; a problem raises ValueError naming
the field. The KVTransfer servicers are registered as generic handlers, so these take and give
bytes: the servicer's methods see only the dataclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import xxhash

from tandem.common.kv_handle import LEASE_SECRET_BYTES, MAX_HANDLE_BLOCKS, KVHandle
from tandem.common.layout import KVLayout
from tandem.common.pb import tandem_pb2 as pb

MAX_HANDLE_ID_CHARS = 256  # request and worker ids in a handle (as the codec's request ids)
MAX_ADDRESS_CHARS = 512
TCP_TOKEN_BYTES = 48  # the tcp transport's one-time token: ticket id (16) + secret (32)


def handle_to_proto(handle: KVHandle) -> pb.KVHandle:
    """P's gRPC edge: the handle that goes into a PrefillResponse."""
    return pb.KVHandle(
        request_id=handle.request_id,
        source_worker_id=handle.source_worker_id,
        source_address=handle.source_address,
        block_ids=handle.block_ids,
        num_tokens=handle.num_tokens,
        layout=handle.layout.describe(),
        block_hashes=handle.block_hashes,
        lease_deadline_unix_s=handle.lease_deadline_unix_s,
        lease_secret=handle.lease_secret,
        source_host_id=handle.source_host_id,
    )


def handle_from_proto(msg: pb.KVHandle) -> KVHandle:
    """Check what a peer sent before anything uses it (ValueError names it). The layout is
    parsed here, once; comparing it with the receiver's is `KVHandle.check`."""
    if not msg.request_id or not msg.source_address:
        raise ValueError("KV handle needs a request_id and a source_address")
    if len(msg.request_id) > MAX_HANDLE_ID_CHARS or len(msg.source_worker_id) > MAX_HANDLE_ID_CHARS:
        raise ValueError(f"KV handle ids must have at most {MAX_HANDLE_ID_CHARS} characters")
    if len(msg.source_host_id) > MAX_HANDLE_ID_CHARS:
        raise ValueError(f"KV handle source_host_id must have at most {MAX_HANDLE_ID_CHARS} characters")
    if len(msg.source_address) > MAX_ADDRESS_CHARS:
        raise ValueError(f"KV handle source_address must have at most {MAX_ADDRESS_CHARS} characters")
    if not math.isfinite(msg.lease_deadline_unix_s):
        raise ValueError("KV handle lease_deadline_unix_s must be finite")
    if len(msg.block_ids) > MAX_HANDLE_BLOCKS or len(msg.block_hashes) > len(msg.block_ids):
        raise ValueError(f"KV handle names {len(msg.block_ids)} blocks and {len(msg.block_hashes)} block hashes")
    if len(set(msg.block_ids)) != len(msg.block_ids):
        raise ValueError("KV handle repeats a block id")
    if len(msg.lease_secret) != LEASE_SECRET_BYTES:
        raise ValueError(f"handle.lease_secret must be {LEASE_SECRET_BYTES} bytes, got {len(msg.lease_secret)}")
    try:
        layout = KVLayout.parse(msg.layout)
    except ValueError as exc:
        raise ValueError(f"handle.layout: {exc}") from None
    return KVHandle(
        request_id=msg.request_id,
        source_worker_id=msg.source_worker_id,
        source_address=msg.source_address,
        block_ids=tuple(msg.block_ids),
        num_tokens=msg.num_tokens,
        layout=layout,
        block_hashes=tuple(msg.block_hashes),
        lease_deadline_unix_s=msg.lease_deadline_unix_s,
        lease_secret=msg.lease_secret,
        source_host_id=msg.source_host_id,
    )


# ---- KVTransfer service ---------------------------------------------------------------------
KV_TRANSFER_SERVICE = pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name  # "tandem.v1.KVTransfer"


# Its servicers are registered as generic handlers, so these take and give bytes: the
# servicer's methods see only the dataclasses. Every request carries the lease's secret from
# the handle; its length is not checked here: the lease table compares it (a wrong one, of any
# length, is refused there like an unknown request id). Every pull also carries the block hashes
# the receiver expects, one per block id (checked here, before anything is allocated); the
# lease table compares them with the lease's.
@dataclass(frozen=True)
class PullKVRequest:
    """A receiver asks for `block_ids` (of the lease of `request_id`), in chunks of at most
    `max_chunk_bytes`. `layout` is the receiver's `KVLayout.describe()`, parsed and compared
    by the source."""

    request_id: str
    block_ids: tuple[int, ...]
    layout: str
    max_chunk_bytes: int
    lease_secret: bytes = field(repr=False)
    block_hashes: tuple[int, ...]  # what the receiver expects block_ids to hold, one per id
    host_id: str = ""  # PullKVShm: the receiver's host id
    receiver_pid: int = 0  # PullKVShm: the receiver's pid
    shm_segment: str = ""  # PullKVShm: the receiver's segment the source packs into
    tcp_token: bytes = field(default=b"", repr=False)  # PullKVTcp: the token it will present (48 bytes)


@dataclass(frozen=True)
class ShmSegment:
    """PullKVShm's answer: the receiver's segment `name` holds the packed blocks in its first
    `size_bytes`, whose xxh64 is `checksum`."""

    name: str
    size_bytes: int
    checksum: int


def shm_segment_to_bytes(segment: ShmSegment) -> bytes:
    return pb.ShmSegment(
        name=segment.name, size_bytes=segment.size_bytes, checksum=segment.checksum
    ).SerializeToString()


def shm_segment_from_bytes(raw: bytes) -> ShmSegment:
    msg = pb.ShmSegment.FromString(raw)
    return ShmSegment(msg.name, msg.size_bytes, msg.checksum)


@dataclass(frozen=True)
class ShmPool:
    """A PullKVShmPool answer: the pool (`name`, `num_blocks`, `source_pid`), then `checksums`
    (one xxh64 per chunk)."""

    name: str
    num_blocks: int
    source_pid: int
    checksums: tuple[int, ...]


def shm_pool_to_bytes(pool: ShmPool) -> bytes:
    return pb.ShmPool(
        name=pool.name, num_blocks=pool.num_blocks, source_pid=pool.source_pid, checksums=pool.checksums
    ).SerializeToString()


def shm_pool_from_bytes(raw: bytes) -> ShmPool:
    msg = pb.ShmPool.FromString(raw)
    return ShmPool(msg.name, msg.num_blocks, msg.source_pid, tuple(msg.checksums))


@dataclass(frozen=True)
class SendKVRequest:
    """The torch transport's control call (proto/tandem.proto, `SendKVRequest`)."""

    request_id: str
    block_ids: tuple[int, ...]
    layout: str
    store_address: str  # host:port of the receiver's TCPStore
    pair_id: str
    tag: int  # first message tag of this transfer within the pair
    lease_secret: bytes = field(repr=False)
    block_hashes: tuple[int, ...]  # as in PullKVRequest
    segment_ends: tuple[int, ...] = ()  # message segments of block_ids (empty: one); see the proto


@dataclass(frozen=True)
class ReleaseKVRequest:
    """End the lease of `request_id` now; `lease_secret` is the handle's."""

    request_id: str
    lease_secret: bytes = field(repr=False)


@dataclass(frozen=True)
class SendKVResult:
    size_bytes: int
    checksum: int  # xxh64 of the packed buffer


def pull_kv_request_to_bytes(request: PullKVRequest) -> bytes:
    return pb.PullKVRequest(
        request_id=request.request_id,
        block_ids=request.block_ids,
        layout=request.layout,
        max_chunk_bytes=request.max_chunk_bytes,
        lease_secret=request.lease_secret,
        block_hashes=request.block_hashes,
        host_id=request.host_id,
        receiver_pid=request.receiver_pid,
        shm_segment=request.shm_segment,
        tcp_token=request.tcp_token,
    ).SerializeToString()


def _expected_hashes(msg: pb.PullKVRequest | pb.SendKVRequest) -> tuple[int, ...]:
    """The block hashes of a pull request: exactly one per block id (the count is checked
    before the tuple is built)."""
    if len(msg.block_hashes) != len(msg.block_ids):
        raise ValueError(f"{len(msg.block_hashes)} block hashes for {len(msg.block_ids)} block ids")
    return tuple(msg.block_hashes)


def pull_kv_request_from_bytes(raw: bytes) -> PullKVRequest:
    msg = pb.PullKVRequest.FromString(raw)
    hashes = _expected_hashes(msg)
    if len(msg.tcp_token) not in (0, TCP_TOKEN_BYTES):
        raise ValueError(f"tcp_token must be empty or {TCP_TOKEN_BYTES} bytes, got {len(msg.tcp_token)}")
    return PullKVRequest(
        msg.request_id,
        tuple(msg.block_ids),
        msg.layout,
        msg.max_chunk_bytes,
        msg.lease_secret,
        hashes,
        msg.host_id,
        msg.receiver_pid,
        msg.shm_segment,
        msg.tcp_token,
    )


def release_kv_request_to_bytes(request: ReleaseKVRequest) -> bytes:
    return pb.ReleaseKVRequest(request_id=request.request_id, lease_secret=request.lease_secret).SerializeToString()


def release_kv_request_from_bytes(raw: bytes) -> ReleaseKVRequest:
    msg = pb.ReleaseKVRequest.FromString(raw)
    return ReleaseKVRequest(msg.request_id, msg.lease_secret)


def release_kv_response_to_bytes(released: bool) -> bytes:
    return pb.ReleaseKVResponse(released=released).SerializeToString()


def release_kv_response_from_bytes(raw: bytes) -> bool:
    return pb.ReleaseKVResponse.FromString(raw).released


def send_kv_request_to_bytes(request: SendKVRequest) -> bytes:
    return pb.SendKVRequest(
        request_id=request.request_id,
        block_ids=request.block_ids,
        layout=request.layout,
        store_address=request.store_address,
        pair_id=request.pair_id,
        tag=request.tag,
        lease_secret=request.lease_secret,
        block_hashes=request.block_hashes,
        segment_ends=request.segment_ends,
    ).SerializeToString()


def send_kv_request_from_bytes(raw: bytes) -> SendKVRequest:
    msg = pb.SendKVRequest.FromString(raw)
    hashes = _expected_hashes(msg)
    return SendKVRequest(
        msg.request_id,
        tuple(msg.block_ids),
        msg.layout,
        msg.store_address,
        msg.pair_id,
        msg.tag,
        msg.lease_secret,
        hashes,
        _segment_ends(msg),
    )


def _segment_ends(msg: pb.SendKVRequest) -> tuple[int, ...]:
    """A SendKV request's segment ends: empty, or strictly increasing and ending at the
    number of block ids."""
    ends = tuple(msg.segment_ends)
    if ends and (ends[-1] != len(msg.block_ids) or any(b <= a for a, b in zip((0, *ends), ends))):
        raise ValueError(
            f"segment_ends {list(ends[:8])} must increase strictly from above 0 to {len(msg.block_ids)} block ids"
        )
    return ends


def send_kv_result_to_bytes(result: SendKVResult) -> bytes:
    return pb.SendKVResponse(size_bytes=result.size_bytes, checksum=result.checksum).SerializeToString()


def send_kv_result_from_bytes(raw: bytes) -> SendKVResult:
    msg = pb.SendKVResponse.FromString(raw)
    return SendKVResult(msg.size_bytes, msg.checksum)


# ---- KV chunks ------------------------------------------------------------------------------
# `KVChunk` carries up to 4 MiB of packed KV. Building the message with protobuf costs three
# copies of the payload (bytes(), the message, SerializeToString) and reading `.data` one more;
# at gigabytes per second those copies are the transfer. So the source writes the exact
# protobuf wire encoding itself, header fields via protobuf and the `data` field (number 2,
# length-delimited) joined straight from the packed buffer, and the receiver finds the `data`
# field in the raw message and reads it through a memoryview. Both sides stay wire-compatible
# with the generated classes (protobuf accepts fields in any order); tests check it both ways.
_DATA_FIELD = 2
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


class ChunkDecodeError(ValueError):
    """A chunk is not valid protobuf wire format, or repeats its data field."""


@dataclass(frozen=True)
class ChunkView:
    """One received chunk; `data` is a view into the message bytes (valid while they live)."""

    offset_bytes: int
    total_bytes: int
    checksum: int
    dtype: str
    shape: tuple[int, ...]
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(
    pieces: list[memoryview], offset_bytes: int, total_bytes: int, dtype: str, shape: tuple[int, ...]
) -> bytes:
    """Source side (a worker thread): one KVChunk in wire format whose data is the
    concatenation of `pieces`, with its xxh64. The pieces are copied once, into the result."""
    hasher = xxhash.xxh64()
    for piece in pieces:
        hasher.update(piece)
    header = pb.KVChunk(
        offset_bytes=offset_bytes,
        checksum=hasher.intdigest(),
        total_bytes=total_bytes,
        dtype=dtype,
        shape=shape,
    ).SerializeToString()
    key = _varint(_DATA_FIELD << 3 | _WIRE_LEN)
    return b"".join((header, key, _varint(sum(len(p) for p in pieces)), *pieces))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ChunkDecodeError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def decode_chunk(raw: bytes) -> ChunkView:
    """Receiver side: parse one KVChunk message without copying its payload."""
    buf = memoryview(raw)
    pos = 0
    data: tuple[int, int] | None = None
    header_parts: list[memoryview] = []
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire == _WIRE_I64:
            pos += 8
        elif wire == _WIRE_I32:
            pos += 4
        elif wire == _WIRE_LEN:
            length, pos = _read_varint(buf, pos)
            if field == _DATA_FIELD:
                if data is not None:
                    raise ChunkDecodeError("chunk repeats its data field")
                data = (pos, pos + length)
                pos += length
                continue
            pos += length
        else:
            raise ChunkDecodeError(f"unsupported wire type {wire} of field {field}")
        if pos > len(buf):
            raise ChunkDecodeError(f"field {field} runs past the end of the chunk")
        header_parts.append(buf[start:pos])
    if data is None or data[1] > len(buf):
        raise ChunkDecodeError("chunk has no data field, or it runs past the end")
    try:
        header = pb.KVChunk.FromString(b"".join(header_parts))
    except Exception as exc:  # protobuf's DecodeError; its base class varies by backend
        raise ChunkDecodeError(f"chunk header does not parse: {exc}") from None
    return ChunkView(
        offset_bytes=header.offset_bytes,
        total_bytes=header.total_bytes,
        checksum=header.checksum,
        dtype=header.dtype,
        shape=tuple(header.shape),
        data=buf[data[0] : data[1]],
    )


# ---- the tcp transport's ticket (PullKVTcp) ------------------------------------------------------


@dataclass(frozen=True)
class TcpTicket:
    """PullKVTcp's answer: connect to `address`, present `token`, read `size_bytes` of packed
    blocks (services/tandem/kvtransfer/tcp_wire.py)."""

    address: str
    token: bytes = field(repr=False)
    size_bytes: int


def tcp_ticket_to_bytes(ticket: TcpTicket) -> bytes:
    return pb.TcpTicket(address=ticket.address, token=ticket.token, size_bytes=ticket.size_bytes).SerializeToString()


def tcp_ticket_from_bytes(raw: bytes) -> TcpTicket:
    msg = pb.TcpTicket.FromString(raw)
    if len(msg.token) != TCP_TOKEN_BYTES:
        raise ValueError(f"ticket.token must be {TCP_TOKEN_BYTES} bytes, got {len(msg.token)}")
    if not 0 < len(msg.address) <= MAX_ADDRESS_CHARS:
        raise ValueError(f"ticket.address must have 1..{MAX_ADDRESS_CHARS} characters, got {len(msg.address)}")
    return TcpTicket(msg.address, msg.token, msg.size_bytes)
