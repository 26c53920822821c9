"""The gRPC transport's receiver-side pieces (`GrpcTransport._receive` and `_pull` use them):
each chunk's header checked against what the pull asked for, its checksum and copy into the
staging buffer in a worker thread, and the last chunk's check and copy done in the same thread
call as the unpack (a pull's thread hops are most of a small pull's fixed cost).

A copy thread writes into the pull's staging buffer: a failed pull waits for it (`settle`)
before the buffer goes back to the pool; a cancelled one does not wait (`settle_later`: its
buffer is forgotten, not given back).
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
import xxhash

from tandem.common.kv_codec import ChunkDecodeError, ChunkView, decode_chunk
from tandem.kvtransfer.base import FailureReason, KVTransferError
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.config import MAX_CHUNK_BYTES


class ExpectedChunks:
    """What every chunk of one pull must say about itself."""

    def __init__(self, total_bytes: int, dtype: str, shape: tuple[int, ...], address: str) -> None:
        self.total_bytes, self.dtype, self.shape, self.address = total_bytes, dtype, shape, address

    def check(self, raw: bytes, offset: int) -> ChunkView:
        try:
            chunk = decode_chunk(raw)
        except ChunkDecodeError as exc:
            raise self._error(f"malformed chunk at offset {offset}: {exc}") from None
        if chunk.total_bytes != self.total_bytes:
            raise self._error(f"chunk says total {chunk.total_bytes} bytes, expected {self.total_bytes}")
        if chunk.dtype != self.dtype or chunk.shape != self.shape:
            raise self._error(f"chunk says {chunk.dtype} {chunk.shape}, expected {self.dtype} {self.shape}")
        if chunk.offset_bytes != offset:
            raise self._error(f"chunk at offset {chunk.offset_bytes}, expected {offset} (not contiguous)")
        size = len(chunk.data)
        if not 0 < size <= MAX_CHUNK_BYTES or offset + size > self.total_bytes:
            raise self._error(f"chunk of {size} bytes at offset {offset} overruns {self.total_bytes} bytes")
        return chunk

    def _error(self, message: str) -> KVTransferError:
        return KVTransferError(FailureReason.PROTOCOL, f"{self.address}: {message}")


def verify_and_copy(chunk: ChunkView, target: np.ndarray, address: str) -> None:
    """Worker thread: check one chunk's xxh64, then copy it into place (`target`: the staging
    buffer's bytes). Both let go of the GIL, so the loop meanwhile takes the next chunk off the
    stream (a memoryview slice assignment would hold it for the whole copy)."""
    got = xxhash.xxh64_intdigest(chunk.data)
    if got != chunk.checksum:
        raise KVTransferError(
            FailureReason.CHECKSUM,
            f"{address}: chunk at offset {chunk.offset_bytes} has xxh64 {got:#018x}, "
            f"the source sent {chunk.checksum:#018x}",
        )
    np.copyto(target[chunk.offset_bytes : chunk.offset_bytes + len(chunk.data)], np.frombuffer(chunk.data, np.uint8))


def land(last: ChunkView, buffer: torch.Tensor, store: KVBlockStore, dst: tuple[int, ...], address: str) -> None:
    """Worker thread, once every other chunk matched and the stream ended: check and copy the
    last chunk, then (only if it matched) unpack the whole buffer into the blocks `dst`."""
    verify_and_copy(last, buffer.numpy(), address)
    store.unpack(buffer, dst)


async def settle(copying: asyncio.Future[None] | None) -> None:
    """A failed pull waits for its chunk copy still in a thread (the copy's own outcome no
    longer matters): the staging buffer it writes goes back to the pool only after it."""
    if copying is not None:
        settle_later(copying)
        await asyncio.wait({copying})


def settle_later(copying: asyncio.Future[None] | None) -> None:
    """A cancelled pull does not wait; the copy's outcome is dropped when it ends."""
    if copying is not None:
        copying.add_done_callback(_drop_outcome)


def _drop_outcome(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved, so that asyncio does not log it as never retrieved
