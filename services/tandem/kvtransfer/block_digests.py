"""Per-block checksums taken once, when a prompt's blocks are committed, and kept with its lease.

A source's pull used to hash the blocks it sends on every pull, beside the receiver's own
pass; on a small host both passes compete for the same cores, and that second pass is most
of what separates a pull from a plain copy. Here the source hashes each full block of a
lease once, in a background thread, as soon as the lease is granted (the prefill worker's
step loop has finished writing those blocks): one crc32c per (plane, block), `digest_blocks`.
A pull then derives the checksums its wire format needs from those with `combine` (crc32c
is linear: crc(A + B) = R_len(B)(crc(A)) ^ crc(B), so the crc32c of a run of blocks is
computed from the blocks' crc32c without reading a byte), and the receiver compares them
with its own hash of what it received, exactly as before. What this changes:
- a pull reads the source's blocks once (the receiver's copy) instead of twice;
- a block pulled several times (a retried or migrated decode) is hashed once;
- a block changed in the pool after its lease was granted fails the receiver's check
  (fail closed), where a per-pull hash would have vouched for the changed bytes.

Lifecycle (`LeaseDigests`, one per source store; the lease table calls it, leases.py):
1. `grant` calls `submit(request_id, full block ids)`: the hashing starts in the digests'
   thread (one: it must not take the step loop's cores from prefill).
2. A pull, inside its lease checkout, calls `for_pull(request_id, block ids)`: the
   `[num_planes, len(ids)]` digests of exactly those ids, waiting for the hash if it is still
   running; None if the lease was granted before the digests were attached or asks for a
   block that was not hashed (the pull then hashes its blocks itself, as before).
3. The lease's end calls `drop(request_id)`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from concurrent import futures

import numpy as np

from tandem.common.checksum import crc32c
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.shm_pool_copy import planes

Digests = np.ndarray  # [num_planes, num_blocks] uint32: crc32c of each block's bytes in each plane


def digest_blocks(planes: Sequence[np.ndarray], block_ids: Sequence[int]) -> Digests:
    """The crc32c of each block of `block_ids` in each plane: `[len(planes), len(block_ids)]`."""
    out = np.empty((len(planes), len(block_ids)), dtype=np.uint32)
    for index, plane in enumerate(planes):
        flat = plane.reshape(-1).data
        size = plane.shape[1]
        out[index] = [crc32c(flat[b * size : (b + 1) * size]) for b in block_ids]
    return out


@functools.lru_cache(maxsize=32)
def _shift_tables(piece_bytes: int, levels: int) -> np.ndarray:
    """`[levels, 4, 256]` uint32: level j applies R_n for n = 2**j * piece_bytes, the linear map
    with crc32c(data + B) = R_len(B)(crc32c(data)) ^ crc32c(B), byte by byte of its argument.
    R_n(x) = crc32c(n zero bytes, x) ^ crc32c(n zero bytes, 0), taken on the 32 unit vectors."""
    zeros = bytes(piece_bytes)
    base = crc32c(zeros, 0)
    images = np.array([crc32c(zeros, 1 << bit) ^ base for bit in range(32)], dtype=np.uint32)
    bits = ((np.arange(256, dtype=np.uint32)[:, None] >> np.arange(8, dtype=np.uint32)) & 1).astype(bool)
    tables = np.empty((levels, 4, 256), dtype=np.uint32)
    for level in range(levels):
        for byte in range(4):  # table[v] = XOR of the images of v's set bits
            chosen = np.where(bits, images[8 * byte : 8 * byte + 8], np.uint32(0))
            tables[level, byte] = np.bitwise_xor.reduce(chosen, axis=1)
        images = _apply(tables[level], images)  # R_2n = R_n after R_n
    return tables


def _apply(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    return (
        table[0][values & 0xFF]
        ^ table[1][(values >> 8) & 0xFF]
        ^ table[2][(values >> 16) & 0xFF]
        ^ table[3][values >> 24]
    )


def combine(digests: np.ndarray, piece_bytes: int, starts: Sequence[int]) -> list[int]:
    """The crc32c of each group of consecutive pieces, from the pieces' own crc32c: `digests`
    (uint32, in order) are of pieces of `piece_bytes` each, and group g is pieces
    `starts[g]` up to the next start (the last to the end). No byte is read."""
    values = np.ascontiguousarray(digests, dtype=np.uint32).reshape(-1)
    bounds = np.asarray(list(starts) + [len(values)], dtype=np.int64)
    ends = np.repeat(bounds[1:], np.diff(bounds))
    shifts = ends - 1 - np.arange(len(values), dtype=np.int64)  # pieces after this one in its group
    levels = int(shifts.max()).bit_length() if len(shifts) else 0
    tables = _shift_tables(piece_bytes, max(levels, 1))
    values = values.copy()
    for level in range(levels):
        chosen = ((shifts >> level) & 1).astype(bool)
        values[chosen] = _apply(tables[level], values[chosen])
    return [int(v) for v in np.bitwise_xor.reduceat(values, bounds[:-1])] if len(values) else []


def combined(digests: Digests, piece_bytes: int) -> int:
    """The crc32c of all the pieces of `digests` in order (row by row), as `combine` with one
    group, by a pairwise tree: level j joins neighbours of 2**j pieces each, so every level
    applies one shift table to half the values (about 0.2 ms for a 64 MiB pull's 8192 pieces,
    a quarter of `combine`'s time). The pieces are padded at the front with zeros to a power
    of two: the result is linear in the digests (R_n(0) = 0), so a zero adds nothing."""
    values = np.ascontiguousarray(digests, dtype=np.uint32).reshape(-1)
    if not len(values):
        return 0
    levels = (len(values) - 1).bit_length()
    tables = _shift_tables(piece_bytes, max(levels, 1))
    tree = np.zeros(1 << levels, dtype=np.uint32)
    tree[len(tree) - len(values) :] = values
    for level in range(levels):
        tree = _apply(tables[level], tree[0::2]) ^ tree[1::2]
    return int(tree[0])


class LeaseDigests:
    """The per-block digests of a source store's leases (module doc). Thread-safe."""

    def __init__(self, store: KVBlockStore) -> None:
        self.store = store
        self.planes = planes(store.kv_caches)  # per plane `[num_blocks, block bytes]` uint8, no copy
        self._lock = threading.Lock()
        self._by_request: dict[str, tuple[dict[int, int], futures.Future[Digests]]] = {}
        self._hasher = futures.ThreadPoolExecutor(1, thread_name_prefix="kv-block-digests")

    def submit(self, request_id: str, block_ids: Sequence[int]) -> None:
        """Start hashing a newly granted lease's full blocks (they are written and pinned)."""
        ids = tuple(block_ids)
        if not ids:
            return
        try:
            future = self._hasher.submit(digest_blocks, self.planes, ids)
        except RuntimeError:  # closed, or the interpreter is exiting: its pulls hash their blocks
            return
        with self._lock:
            self._by_request[request_id] = ({b: i for i, b in enumerate(ids)}, future)

    def for_pull(self, request_id: str, block_ids: Sequence[int]) -> Digests | None:
        """Lease checked out: the `[num_planes, len(block_ids)]` digests taken at grant, waiting
        for them if need be; None if there are none for all of these blocks."""
        with self._lock:
            entry = self._by_request.get(request_id)
        if entry is None:
            return None
        positions, future = entry
        columns = [positions.get(b, -1) for b in block_ids]
        if -1 in columns:
            return None
        try:
            digests = future.result()
        except (futures.CancelledError, OSError, ValueError):  # closed meanwhile: the pull hashes itself
            return None
        return digests[:, columns]

    def drop(self, request_id: str) -> None:
        """The lease ended: forget its digests (a hash still running finishes unused)."""
        with self._lock:
            self._by_request.pop(request_id, None)

    def close(self) -> None:
        self._hasher.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._by_request.clear()
