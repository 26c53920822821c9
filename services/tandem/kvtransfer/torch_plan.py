"""The message plan of a torch KV transfer: which bytes of the packed layout each send/recv
carries, and where each side reads or writes them.

Both sides compute the same plan from the number of blocks and the segment ends the receiver
names in SendKV (`plan_segments`, field `segment_ends`). The messages, in tag order, always
concatenate to the packed layout of block_store.py (`[num_layers, 2, n, block_size, heads,
head_dim]`), so the xxh64 that both sides compute over them in that order is the xxh64 of the
packed buffer, whatever the plan.

- One segment (no `segment_ends`): planes are grouped into messages of at least
  MIN_MESSAGE_BYTES. A one-plane message is one cache slice on a side whose ids are one run.
- Several segments (large transfers whose ids are runs on both sides, as a block pool hands
  them out after churn): every plane moves as one message per segment, plane-major. A
  segment's message is a slice of the cache, `kv_caches[layer][kv, first:first + length]`, on
  a side whose ids in that segment are one ascending run: the source sends from it and the
  receiver receives into it, with no staging copy. Other segments (merged short runs) are
  packed into / unpacked from a staging buffer at their packed offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.kvtransfer.block_store import KVBlockStore

MIN_MESSAGE_BYTES = 1 << 20  # planes are grouped into messages of at least this many bytes


@dataclass(frozen=True)
class Message:
    """One send/recv of a transfer: planes [first_plane, end_plane) of the packed layout for the
    block ids at positions [first_block, end_block) of the transfer, at [offset_bytes,
    offset_bytes + size_bytes) of the packed buffer."""

    first_plane: int
    end_plane: int
    first_block: int
    end_block: int
    offset_bytes: int
    size_bytes: int


def cache_views(
    messages: Sequence[Message], store: KVBlockStore, block_ids: Sequence[int]
) -> list[torch.Tensor | None]:
    """Each message's bytes as a uint8 view of `store`'s cache (no copy) when it is one plane
    and its `block_ids[first_block:end_block]` are one ascending run; else None (staged).
    The ids were checked against the store by the caller (`check_pull`, the source's lease)."""
    run_starts: dict[tuple[int, int], int | None] = {}  # segment -> its first block id if a run
    views: list[torch.Tensor | None] = []
    for m in messages:
        segment = (m.first_block, m.end_block)
        if segment not in run_starts:
            ids = block_ids[m.first_block : m.end_block]
            run_starts[segment] = ids[0] if all(b == ids[0] + i for i, b in enumerate(ids)) else None
        first = run_starts[segment]
        one_plane = m.end_plane - m.first_plane == 1
        views.append(
            store.run_view(first, m.end_block - m.first_block, m.first_plane)
            if first is not None and one_plane
            else None
        )
    return views


def plan_segments(src: Sequence[int], dst: Sequence[int], store: KVBlockStore, min_run_bytes: int) -> tuple[int, ...]:
    """Receiver side: the segment ends to send in SendKV for pulling `src` into `dst`. Empty
    (one segment) unless a plane of the transfer is at least MIN_MESSAGE_BYTES and the ids
    split into several runs. Joint runs (consecutive in both `src` and `dst`) of at least
    `min_run_bytes` per plane (`KVTransferConfig.direct_min_run_bytes`) are segments of their
    own; the runs between them are merged into one segment each (staged on a side where they
    are not one run)."""
    num_blocks = len(src)
    if store.plane_bytes(num_blocks) < MIN_MESSAGE_BYTES:
        return ()
    min_blocks = -(-min_run_bytes // store.plane_bytes(1))
    runs, start = [], 0
    for pos in range(1, num_blocks + 1):
        if pos == num_blocks or src[pos] != src[pos - 1] + 1 or dst[pos] != dst[pos - 1] + 1:
            runs.append((start, pos))
            start = pos
    ends: list[int] = []
    short_start: int | None = None  # start of the pending merged segment of short runs
    for first, end in runs:
        if end - first >= min_blocks:
            if short_start is not None:
                ends.append(first)
                short_start = None
            ends.append(end)
        elif short_start is None:
            short_start = first
    if short_start is not None:
        ends.append(num_blocks)
    return tuple(ends) if len(ends) > 1 else ()


def plan_messages(num_blocks: int, store: KVBlockStore, segment_ends: Sequence[int] = ()) -> list[Message]:
    """The messages of a transfer of `num_blocks` blocks cut at `segment_ends` (see the module
    docstring); both sides compute the same plan."""
    plane = store.plane_bytes(num_blocks)
    messages = []
    if not segment_ends:
        per = max(1, -(-MIN_MESSAGE_BYTES // plane)) if plane else store.num_planes
        for first in range(0, store.num_planes, per):
            end = min(first + per, store.num_planes)
            messages.append(Message(first, end, 0, num_blocks, first * plane, (end - first) * plane))
        return messages
    block_bytes = store.plane_bytes(1)
    starts = (0, *segment_ends[:-1])
    for p in range(store.num_planes):
        for first_block, end_block in zip(starts, segment_ends):
            offset = p * plane + first_block * block_bytes
            messages.append(Message(p, p + 1, first_block, end_block, offset, (end_block - first_block) * block_bytes))
    return messages
