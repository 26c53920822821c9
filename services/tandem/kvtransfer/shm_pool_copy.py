"""The copies and checksums of a one-copy same-host pull (shm_pool_source.py): the receiver
copies blocks out of the source's shared pool into its own blocks, hashing them, while the
source hashes the same blocks in its pool.

Chunks (DESIGN.md section 4: KV moves in chunks of 1 to 4 MiB, each with a checksum): the
pull's packed bytes (block_store.py's layout: plane `2 * layer + kv`, then the pull's block
ids in order) cut per plane into runs of at most CHUNK_BYTES of positions; chunk i is
`(plane, first position, end position)`, in packed order, and both sides compute one crc32c
per chunk over exactly those bytes. Independent chunk digests let the receiver copy and hash
on several threads (numpy's copies and crc32c release the GIL): on the 2-core development
machine, two threads take a 64 MiB pull from 12 ms to 7 ms.

crc32c, not xxh64 (DESIGN.md allows both): tandem.common.checksum's hashes bytes in cache
several times as fast (70 or 26 GB/s, by CPU, against xxh64's 10 here), and a pull hashes its
bytes once on each side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from tandem.common.checksum import crc32c
from tandem.kvtransfer.shm_chunks import CHUNK_BYTES

Run = tuple[int, int, int]  # (first source block id, first destination block id, length)
Chunk = tuple[int, int, int]  # (plane, first position, end position)
MAX_COPY_THREADS = 4  # a receiver's threads per pull (at most the host's cores)
# bytes per copy thread: a smaller pull is copied on one thread, because each thread's hand-off
# costs the receiver's asyncio thread more than copying a few MiB takes (a 4 MiB copy and hash:
# about 0.8 ms on the 2-core development machine)
MIN_BYTES_PER_THREAD = 4 << 20


def runs(src: Sequence[int], dst: Sequence[int], max_len: int) -> list[Run]:
    """The pull as runs consecutive on both sides, in order, each at most `max_len` blocks."""
    out: list[Run] = []
    for s, d in zip(src, dst, strict=True):
        if out and out[-1][2] < max_len and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((s, d, 1))
    return out


def planes(kv_caches: list[torch.Tensor]) -> list[np.ndarray]:
    """The cache's planes (layer, then K/V) as `[num_blocks, block bytes]` uint8 arrays, no
    copy: numpy slices cost far less per run than torch ops (a pull has hundreds of runs)."""
    return [cache[kv].reshape(cache.shape[1], -1).view(torch.uint8).numpy() for cache in kv_caches for kv in (0, 1)]


def chunks(num_planes: int, num_ids: int, block_bytes: int) -> list[Chunk]:
    """The pull's chunks (module doc) for `num_ids` blocks of `block_bytes` per plane."""
    per = max(1, CHUNK_BYTES // block_bytes)
    return [
        (plane, first, min(first + per, num_ids)) for plane in range(num_planes) for first in range(0, num_ids, per)
    ]


def copy_threads(num_chunks: int, size_bytes: int) -> int:
    """The threads that copy a pull of `num_chunks` chunks and `size_bytes` bytes."""
    by_size = size_bytes // MIN_BYTES_PER_THREAD
    if by_size <= 1:  # most pulls: no os.cpu_count() (about 10 us a call here)
        return 1
    return max(1, min(MAX_COPY_THREADS, os.cpu_count() or 1, num_chunks, by_size))


def hash_chunks(src_planes: list[np.ndarray], ids: Sequence[int]) -> list[int]:
    """Source, worker thread, lease checked out: the crc32c of each chunk of the blocks `ids`."""
    plan = chunks(len(src_planes), len(ids), src_planes[0].shape[1])
    ranges = {(first, end): runs(ids[first:end], ids[first:end], end - first) for _, first, end in plan}
    digests = []
    for plane, first, end in plan:
        value = 0
        for s, _, n in ranges[first, end]:
            value = crc32c(src_planes[plane][s : s + n].data, value)
        digests.append(value)
    return digests


def copy_and_hash(
    src_planes: list[np.ndarray],
    src: Sequence[int],
    dst_planes: list[np.ndarray],
    dst: Sequence[int],
    part: Sequence[int] | None = None,
) -> list[int]:
    """Receiver, worker thread: copy the chunks numbered `part` (default: all) of blocks `src`
    of the source's pool into blocks `dst` of our cache, run by run, hashing each run in the
    destination right after its copy, while it is in cache; returns each chunk's crc32c of what
    was written, in `part`'s order (`hash_chunks`' digests of those chunks)."""
    plan = chunks(len(dst_planes), len(src), dst_planes[0].shape[1])
    indices = range(len(plan)) if part is None else part
    ranges: dict[tuple[int, int], list[Run]] = {}
    digests = []
    for index in indices:
        plane, first, end = plan[index]
        pieces = ranges.get((first, end))
        if pieces is None:
            pieces = ranges[first, end] = runs(src[first:end], dst[first:end], end - first)
        src_plane, dst_plane = src_planes[plane], dst_planes[plane]
        value = 0
        for s, d, n in pieces:
            rows = dst_plane[d : d + n]
            rows[...] = src_plane[s : s + n]
            value = crc32c(rows.data, value)
        digests.append(value)
    return digests
