"""The tcp transport's in-band pull request: on a data connection that already carried a pull
(so one a ticket's token authenticated: tcp_source.py), the receiver sends the pull request
itself instead of calling PullKVTcp and presenting a new token.

    D -> P   REQUEST   magic b"TKR1", the pull's timeout in ms (> 0), the body's length (at
                       most `request_cap`, checked before a byte of the body is read)
    D -> P   body      a PullKVRequest protobuf: PullKVTcp's fields, without a token

P answers as on a token (tcp_wire.py): the header, then the blocks and the trailer, or a
header that refuses with PullKVTcp's code and message. No pickle; every field is checked
before use, and a frame that is not one closes the connection.
"""

from __future__ import annotations

import socket
import struct

from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from tandem.common import kv_codec
from tandem.kvtransfer import tcp_wire

REQUEST_MAGIC = b"TKR1"
REQUEST = struct.Struct("<4sII")  # magic, timeout in ms, body length


class MalformedRequest(Exception):
    """An in-band request frame that is not one (the source closes the connection)."""


def request_cap(max_blocks_per_pull: int) -> int:
    """The largest request body a source reads: a layout and a request id of at most 4 KiB,
    and one id (varint, at most 5 bytes) and one hash (at most 10) per block."""
    return 4096 + 16 * max_blocks_per_pull


def encode_request(request: kv_codec.PullKVRequest, timeout_s: float) -> bytes:
    """The in-band request frame of a pull that must end within `timeout_s`."""
    body = kv_codec.pull_kv_request_to_bytes(request)
    timeout_ms = min(max(int(timeout_s * 1000), 1), 2**32 - 1)
    return REQUEST.pack(REQUEST_MAGIC, timeout_ms, len(body)) + body


def read_request(
    sock: socket.socket, first: bytes, deadline_s: float, peer: str, cap: int
) -> tuple[kv_codec.PullKVRequest, float]:
    """An in-band request whose `first` bytes were read already, and its timeout in seconds.
    MalformedRequest if the frame is not one (the body is not read if its length exceeds
    `cap`); KVTransferError as `recv_views` if it does not arrive by `deadline_s`."""
    head = first + tcp_wire.recv_exact(sock, REQUEST.size - len(first), deadline_s, peer)
    magic, timeout_ms, size = REQUEST.unpack(head)
    if magic != REQUEST_MAGIC or timeout_ms == 0 or size > cap:
        raise MalformedRequest(f"magic {magic!r}, timeout {timeout_ms} ms, {size} bytes (at most {cap})")
    body = tcp_wire.recv_exact(sock, size, deadline_s, peer)
    try:
        request = kv_codec.pull_kv_request_from_bytes(body)
    except (DecodeError, ValueError) as exc:
        raise MalformedRequest(f"body: {exc}") from None
    if request.tcp_token:
        raise MalformedRequest("body: a tcp_token in an in-band request")
    return request, timeout_ms / 1000
