"""Per-block checksums taken at lease grant (kvtransfer/block_digests.py): the crc32c of a run
of blocks combined from the blocks' own, and their life with the lease."""

from __future__ import annotations

import crc32c
import numpy as np
import pytest
import torch

from tandem.common.layout import KVLayout
from tandem.engine.outputs import HeldKV
from tandem.kvtransfer.block_digests import combine, combined, digest_blocks
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.shm_pool_copy import planes


@pytest.mark.parametrize("piece_bytes", [1, 3, 4096, 8192, 40000])
def test_combined_digests_equal_the_crc32c_of_the_concatenated_bytes(piece_bytes: int) -> None:
    rng = np.random.default_rng(piece_bytes)
    data = rng.integers(0, 256, (3, 37, piece_bytes), dtype=np.uint8)  # 3 planes of 37 blocks
    ids = [int(i) for i in rng.permutation(37)[:21]]
    digests = digest_blocks(list(data), ids)
    assert digests.shape == (3, 21) and digests.dtype == np.uint32
    assert digests[1, 4] == crc32c.crc32c(data[1, ids[4]].tobytes())
    groups = [0, 5, 6, 20]  # pieces 0-4, 5, 6-19, 20 of plane 0

    def crc(plane: int, first: int, end: int) -> int:
        return crc32c.crc32c(data[plane, ids[first:end]].tobytes())

    assert combine(digests[0], piece_bytes, groups) == [crc(0, 0, 5), crc(0, 5, 6), crc(0, 6, 20), crc(0, 20, 21)]
    # the whole pull in packed order (plane by plane), as the tcp trailer
    assert combine(digests, piece_bytes, [0]) == [crc32c.crc32c(data[:, ids].tobytes())]
    assert combine(np.zeros(0, dtype=np.uint32), piece_bytes, []) == []


@pytest.mark.parametrize("num_pieces", [1, 2, 3, 7, 8, 9, 64, 97])
def test_combined_over_a_tree_equals_the_crc32c_of_every_piece_in_order(num_pieces: int) -> None:
    rng = np.random.default_rng(num_pieces)
    data = rng.integers(0, 256, (2, num_pieces, 24), dtype=np.uint8)  # 2 planes: the row order counts
    digests = digest_blocks(list(data), range(num_pieces))
    assert combined(digests, 24) == crc32c.crc32c(data.tobytes())
    assert combined(digests[:1], 24) == crc32c.crc32c(data[0].tobytes())
    assert combined(np.zeros((2, 0), dtype=np.uint32), 24) == 0


def small_store() -> KVBlockStore:
    layout = KVLayout("llama", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_size=4)
    generator = torch.Generator().manual_seed(3)
    caches = [torch.randn((2, 12, 4, 2, 8), generator=generator) for _ in range(2)]
    return KVBlockStore(caches, layout)


def test_a_lease_granted_after_the_digests_are_attached_is_hashed_per_full_block_and_dropped_when_freed() -> None:
    store, freed = small_store(), []
    leases = LeaseTable(on_free=freed.append)
    before = leases.grant("early", HeldKV((0, 1), 8, (10, 11)), 30.0)  # before any digests: none
    digests = leases.digests_for(store)
    assert leases.digests_for(store) is digests  # one per table and store
    granted = leases.grant("req", HeldKV((5, 6, 7), 11, (20, 21)), 30.0)  # block 7 is partial: no hash
    expected = digest_blocks(planes(store.kv_caches), (6, 5))
    got = digests.for_pull("req", (6, 5))
    assert got is not None and got.tolist() == expected.tolist()
    assert digests.for_pull("req", (5, 7)) is None  # not a full block: the pull hashes itself
    assert digests.for_pull("early", (0, 1)) is None
    assert leases.release("req", granted.secret) is True and freed == ["req"]
    assert digests.for_pull("req", (5, 6)) is None
    assert leases.release("early", before.secret) is True and freed == ["req", "early"]
    digests.close()
