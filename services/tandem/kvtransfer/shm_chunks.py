"""One pull's bytes through a segment in chunks: the source packs and hashes chunk after chunk
and publishes how far it got; the receiver hashes and unpacks each chunk as soon as it is
published, so that the two processes work at the same time (on two cores, a pull costs about
one side's work instead of both sides' in a row).

Segment layout (shm_segments.py): `[HEADER_BYTES header][packed bytes of the pull]`, the packed
bytes in block_store.py's layout. Header word 0 (int64, native order): how many packed bytes
the source has written, always at a chunk's end. The receiver sets it to 0 before it lends the
segment; the source raises it after each chunk; nobody else writes it. A chunk is `(plane, first
position, end position)`: positions [first, end) of the pull's block ids in plane `2 * layer +
kv`, at most CHUNK_BYTES; chunks come in packed order.

Integrity: both sides hash the same chunks in order with one streaming xxh64, which is the
xxh64 of the whole packed buffer; the receiver compares the source's (in the PullKVShm answer)
with its own only at the end. So on a CPU receiver the destination blocks are written before
the check, and are undefined after a checksum failure, as with the torch transport (base.py:
the decode worker gives them back uncached and recomputes). A CUDA receiver hashes chunk by
chunk too, but unpacks only after the check. A chunk read before it was fully written (only
possible where stores may be reordered, not on x86) fails the check, so no sequence ever runs
on it. The two sides' chunks need not be the same: the word counts bytes, the hash streams.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
import xxhash

from tandem.kvtransfer.block_store import KVBlockStore

HEADER_BYTES = 4096  # one page, so that the packed bytes stay page-aligned
CHUNK_BYTES = 2 << 20  # at most this much per chunk (a CPU's L2 or so): small enough to pipeline
POLL_S, MAX_POLL_S = 0.0001, 0.001  # the receiver's waits between looks at the progress word
FRAGMENTED_RUNS_FRACTION = 8  # more runs than len(ids) / 8: one index op per chunk, not a copy per run


def progress_word(segment_view: torch.Tensor) -> np.ndarray:
    """Header word 0 of a segment (its uint8 view) as a 1-element int64 array over the mapping."""
    return segment_view[:8].numpy().view(np.int64)


class ChunkPlan:
    """The chunks of one pull of `block_ids` from or into `store`, and the copies between a
    chunk of the packed bytes and the cache. `per_chunk_copies` (default: a CPU cache) says
    whether each side copies chunk by chunk; else the source packs all at once and the
    receiver unpacks after the check (`store.pack`/`unpack`: the CUDA kernels)."""

    def __init__(self, store: KVBlockStore, block_ids: tuple[int, ...], per_chunk_copies: bool | None = None) -> None:
        self.store, self.ids = store, block_ids
        self.per_chunk_copies = store.device.type == "cpu" if per_chunk_copies is None else per_chunk_copies
        self.block_bytes = store.plane_bytes(1)  # one block of one plane
        self.plane_bytes = store.plane_bytes(len(block_ids))
        self.size_bytes = store.num_planes * self.plane_bytes
        per_chunk = max(1, CHUNK_BYTES // self.block_bytes)
        self.chunks = [
            (plane, first, min(first + per_chunk, len(block_ids)))
            for plane in range(store.num_planes)
            for first in range(0, len(block_ids), per_chunk)
        ]
        self.runs: list[tuple[int, int, int]] = []  # (position, first block id, length)
        for pos, block in enumerate(block_ids):
            if self.runs and self.runs[-1][1] + self.runs[-1][2] == block:
                self.runs[-1] = (self.runs[-1][0], self.runs[-1][1], self.runs[-1][2] + 1)
            else:
                self.runs.append((pos, block, 1))
        fragmented = len(self.runs) * FRAGMENTED_RUNS_FRACTION > len(block_ids) and len(self.runs) > 1
        self.index = torch.tensor(block_ids, dtype=torch.long, device=store.device) if fragmented else None

    def byte_range(self, chunk: tuple[int, int, int]) -> tuple[int, int]:
        plane, first, end = chunk
        base = plane * self.plane_bytes
        return base + first * self.block_bytes, base + end * self.block_bytes

    def _rows(self, packed: torch.Tensor, chunk: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's packed bytes as `[end - first, block_size, kv_heads, head_dim]` values,
        and its plane of the cache `[num_blocks, block_size, kv_heads, head_dim]`."""
        plane, first, end = chunk
        layer, kv = divmod(plane, 2)
        cache = self.store.kv_caches[layer][kv]
        return packed.view(self.store.dtype).view(end - first, *cache.shape[1:]), cache

    def _pieces(self, chunk: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """(row in the chunk, block id, length) of each run's part inside the chunk."""
        _, first, end = chunk
        pieces = []
        for pos, block, length in self.runs:
            lo, hi = max(first, pos), min(end, pos + length)
            if lo < hi:
                pieces.append((lo - first, block + lo - pos, hi - lo))
        return pieces

    def gather(self, chunk: tuple[int, int, int], packed: torch.Tensor) -> None:
        """Copy the chunk's blocks from the cache into `packed` (its bytes, 1-D uint8)."""
        rows, cache = self._rows(packed, chunk)
        if self.index is not None:
            torch.index_select(cache, 0, self.index[chunk[1] : chunk[2]], out=rows)
            return
        for row, block, length in self._pieces(chunk):
            rows.narrow(0, row, length).copy_(cache.narrow(0, block, length))

    def scatter(self, chunk: tuple[int, int, int], packed: torch.Tensor) -> None:
        """Copy the chunk's packed bytes into its blocks of the cache."""
        rows, cache = self._rows(packed, chunk)
        if self.index is not None:
            cache.index_copy_(0, self.index[chunk[1] : chunk[2]], rows)
            return
        for row, block, length in self._pieces(chunk):
            cache.narrow(0, block, length).copy_(rows.narrow(0, row, length))


def write_chunks(plan: ChunkPlan, data: torch.Tensor, progress: np.ndarray) -> int:
    """Source, worker thread, lease checked out: pack the pull into `data` (the segment's packed
    bytes) chunk by chunk, publishing each in `progress` as soon as it is copied (the receiver
    reads it while the source hashes it; nobody writes it again); return the xxh64 of all of
    them. Without `per_chunk_copies` (CUDA) it packs at once (the pack kernel, then one copy to
    the host), publishes it all, then hashes."""
    hasher = xxhash.xxh64()
    if not plan.per_chunk_copies:
        plan.store.pack(plan.ids, out=data)
        progress[0] = plan.size_bytes
        hasher.update(data.numpy().data)
        return hasher.intdigest()
    for chunk in plan.chunks:
        start, end = plan.byte_range(chunk)
        piece = data[start:end]
        plan.gather(chunk, piece)
        progress[0] = end
        hasher.update(piece.numpy().data)
    return hasher.intdigest()


def read_chunks(
    plan: ChunkPlan, data: torch.Tensor, progress: np.ndarray, source_done: threading.Event
) -> tuple[int, int]:
    """Receiver, worker thread: hash each chunk once the source has published it and, with
    `per_chunk_copies`, unpack it. Returns (bytes read, their xxh64). Stops early once `source_done` is set
    (the PullKVShm call ended) and nothing more is published."""
    hasher = xxhash.xxh64()
    read = 0
    for chunk in plan.chunks:
        start, end = plan.byte_range(chunk)
        if not _wait_for(progress, end, source_done):
            break
        piece = data[start:end]
        hasher.update(piece.numpy().data)
        if plan.per_chunk_copies:
            plan.scatter(chunk, piece)
        read = end
    return read, hasher.intdigest()


def _wait_for(progress: np.ndarray, end: int, source_done: threading.Event) -> bool:
    """Whether the source published up to `end`; False once it is done and has not. The event
    is read before the word: a word read after the source was done is its last. Polls every
    POLL_S at first, backing off to MAX_POLL_S while nothing comes (a slow or stuck source
    costs no busy core)."""
    poll_s = POLL_S
    while True:
        done = source_done.is_set()
        if int(progress[0]) >= end:
            return True
        if done:
            return False
        time.sleep(poll_s)
        poll_s = min(poll_s * 2, MAX_POLL_S)
