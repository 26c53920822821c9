"""KVChunk wire codec that never copies the payload more than once.

`KVChunk` (proto/tandem.proto) carries up to 4 MiB of packed KV. Building the message with
protobuf costs three copies of the payload (bytes(), the message, SerializeToString) and
reading `.data` one more; at gigabytes per second those copies are the transfer. So the source
writes the exact protobuf wire encoding itself, header fields via protobuf and the `data` field
(number 2, length-delimited) joined straight from the packed buffer, and the receiver finds the
`data` field in the raw message and reads it through a memoryview. Both sides stay
wire-compatible with the generated classes (protobuf accepts fields in any order), and the
tests check it both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from tandem.common.pb import tandem_pb2 as pb

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
