"""The chunked same-host copy (kvtransfer/shm_chunks.py): the chunk plan, the source's writer
and the receiver's reader over one buffer, in order, concurrently, and cut short."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
import xxhash

from tandem.kvtransfer import shm_chunks
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.shm_chunks import HEADER_BYTES, ChunkPlan, progress_word, read_chunks, write_chunks
from tests.integration.test_kvtransfer import (
    assert_moved,
    assert_untouched,
    make_dest,
    make_layout,
    make_source,
    snapshot,
)

SRC = tuple(range(10, 40))  # one run, as a source's lease
DST_RUNS = (*range(70, 80), *range(50, 60), *range(80, 90))  # three runs: slice copies
DST_SCATTERED = tuple(range(95, 35, -2))  # 30 runs of one block: index ops


def buffer_for(plan: ChunkPlan) -> tuple[torch.Tensor, np.ndarray]:
    """A segment's packed bytes (filled with 7s) and its progress word (0)."""
    segment = torch.full((HEADER_BYTES + plan.size_bytes,), 7, dtype=torch.uint8)
    progress = progress_word(segment)
    progress[0] = 0
    return segment[HEADER_BYTES:], progress


def test_plan_chunks_cover_the_packed_bytes_in_order(monkeypatch) -> None:
    monkeypatch.setattr(shm_chunks, "CHUNK_BYTES", 12 * 4096)  # 12 blocks of 4 KiB per plane chunk
    store = make_source(make_layout()).store  # 2 layers: 4 planes; 4 KiB per block and plane
    plan = ChunkPlan(store, SRC)
    assert (plan.block_bytes, plan.plane_bytes, plan.size_bytes) == (4096, 30 * 4096, 4 * 30 * 4096)
    assert plan.chunks == [(p, first, end) for p in range(4) for first, end in ((0, 12), (12, 24), (24, 30))]
    ranges = [plan.byte_range(c) for c in plan.chunks]
    assert ranges[0] == (0, 12 * 4096) and ranges[-1] == (3 * 30 * 4096 + 24 * 4096, plan.size_bytes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, in packed order
    assert plan.runs == [(0, 10, 30)] and plan.index is None
    assert ChunkPlan(store, DST_RUNS).runs == [(0, 70, 10), (10, 50, 10), (20, 80, 10)]
    assert ChunkPlan(store, DST_RUNS).index is None and ChunkPlan(store, DST_SCATTERED).index is not None


@pytest.mark.parametrize("dst_ids", [DST_RUNS, DST_SCATTERED], ids=["runs", "scattered"])
@pytest.mark.parametrize("per_chunk_copies", [True, False], ids=["per-chunk", "whole"])
def test_written_then_read_moves_the_blocks_exactly(monkeypatch, dst_ids, per_chunk_copies) -> None:
    monkeypatch.setattr(shm_chunks, "CHUNK_BYTES", 7 * 4096)
    layout = make_layout()
    source, dest = make_source(layout).store, make_dest(layout)
    before = snapshot(dest)
    written = ChunkPlan(source, SRC, per_chunk_copies)
    data, progress = buffer_for(written)
    digest = write_chunks(written, data, progress)
    packed = source.pack(SRC).view(torch.uint8)
    assert digest == xxhash.xxh64_intdigest(packed.numpy().data) and torch.equal(data, packed)
    assert int(progress[0]) == written.size_bytes
    done = threading.Event()
    done.set()
    read = ChunkPlan(dest, dst_ids, per_chunk_copies)
    assert read_chunks(read, data, progress, done) == (read.size_bytes, digest)
    if per_chunk_copies:
        assert_moved(source, SRC, dest, dst_ids, before)
    else:  # the receiver only verified: the caller unpacks
        assert_untouched(dest, before)


def test_reader_follows_a_concurrent_writer() -> None:
    layout = make_layout(num_layers=4)
    source, dest = make_source(layout).store, make_dest(layout)
    before = snapshot(dest)
    written, read = ChunkPlan(source, SRC), ChunkPlan(dest, DST_RUNS)
    data, progress = buffer_for(written)
    done = threading.Event()
    result: list[tuple[int, int]] = []
    reader = threading.Thread(target=lambda: result.append(read_chunks(read, data, progress, done)))
    reader.start()  # before anything is published
    digest = write_chunks(written, data, progress)
    reader.join(10)
    done.set()
    assert result == [(read.size_bytes, digest)]
    assert_moved(source, SRC, dest, DST_RUNS, before)


def test_reader_stops_at_what_was_published_once_the_source_is_done(monkeypatch) -> None:
    monkeypatch.setattr(shm_chunks, "CHUNK_BYTES", 10 * 4096)
    layout = make_layout()
    source, dest = make_source(layout).store, make_dest(layout)
    before = snapshot(dest)
    written, read = ChunkPlan(source, SRC), ChunkPlan(dest, DST_RUNS)
    data, progress = buffer_for(written)
    write_chunks(written, data, progress)
    progress[0] = 4 * 4096 + 30 * 4096  # plane 0, and 4 blocks of plane 1: not a chunk's end
    done = threading.Event()
    done.set()
    got, digest = read_chunks(read, data, progress, done)
    assert got == 30 * 4096  # the three chunks of plane 0
    assert digest == xxhash.xxh64_intdigest(data[:got].numpy().data)
    for layer in range(2):
        for kv in (0, 1):
            moved = (layer, kv) == (0, 0)  # plane 0
            expected = source.kv_caches[0][0][list(SRC)] if moved else before[layer][kv][list(DST_RUNS)]
            assert torch.equal(dest.kv_caches[layer][kv][list(DST_RUNS)], expected)
    others = [b for b in range(dest.num_blocks) if b not in DST_RUNS]
    assert all(torch.equal(c[:, others], b[:, others]) for c, b in zip(dest.kv_caches, before))


def test_plan_views_are_typed_like_the_cache() -> None:
    layout = make_layout(dtype="bfloat16")
    store = KVBlockStore(make_source(layout).store.kv_caches, layout)
    plan = ChunkPlan(store, SRC)
    data, progress = buffer_for(plan)
    write_chunks(plan, data, progress)
    assert torch.equal(data, store.pack(SRC).view(torch.uint8))
