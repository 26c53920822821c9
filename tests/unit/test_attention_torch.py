"""The torch attention backend's decode path: length buckets and their results."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.attention import AttentionMetadata, length_buckets
from tandem.engine.attention_torch import TorchAttentionBackend
from tandem.kernels.reference import ref_paged_prefill_attention

BS, KVH, H, D = 16, 2, 4, 32


@pytest.mark.parametrize(
    ("seq_lens", "expected"),
    [
        ((), ()),
        ((7,), ((0,),)),
        ((100, 120, 90, 300), ((0, 1, 2, 3),)),  # padding 200+180+210 = 590 tokens: one group
        ((1024, 250, 40, 260, 300), ((0,), (1, 2, 3, 4))),  # (1024-300)*4 = 2896 > 2048 and 1024 > 600
        ((1024, 300), ((0, 1),)),  # (1024-300)*1 = 724: not worth a second call
        ((3000, 1000, 400, 100), ((0,), (1, 2, 3))),  # 1000 -> 400: 600*2 = 1200 <= 2048, kept
        ((5000, 2000, 900, 10, 10, 10, 10), ((0,), (1,), (2,), (3, 4, 5, 6))),  # 890*4 = 3560 > 2048
        ((50, 50, 50), ((0, 1, 2),)),
    ],
)
def test_length_buckets(seq_lens: tuple[int, ...], expected: tuple[tuple[int, ...], ...]) -> None:
    assert length_buckets(seq_lens) == expected


def _decode_metadata(seq_lens: list[int]) -> AttentionMetadata:
    """Sequence i owns a run of blocks in reverse order; its new token is its last position."""
    blocks_per_seq = -(-max(seq_lens) // BS)
    tables = torch.tensor(
        [[(i + 1) * blocks_per_seq - 1 - j for j in range(blocks_per_seq)] for i in range(len(seq_lens))],
        dtype=torch.int32,
    )
    slots = [int(tables[i, (n - 1) // BS]) * BS + (n - 1) % BS for i, n in enumerate(seq_lens)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        query_lens=(1,) * len(seq_lens),
        seq_lens_host=tuple(seq_lens),
        block_size=BS,
    )


@pytest.mark.parametrize("seq_lens", [[40, 1030, 9, 300, 17], [33, 48, 20]], ids=["split", "one-group"])
def test_bucketed_decode_matches_the_reference(seq_lens: list[int]) -> None:
    meta = _decode_metadata(seq_lens)
    assert len(meta.length_buckets) == (2 if len(seq_lens) == 5 else 1)
    g = torch.Generator().manual_seed(0)
    num_blocks = len(seq_lens) * meta.block_tables.shape[1]
    kv_cache = torch.randn((2, num_blocks, BS, KVH, D), generator=g)
    query, key, value = (torch.randn((len(seq_lens), n, D), generator=g) for n in (H, KVH, KVH))

    out = TorchAttentionBackend().forward(query, key, value, kv_cache, meta, D**-0.5)

    expected = ref_paged_prefill_attention(
        query, kv_cache[0], kv_cache[1], meta.block_tables, meta.query_start_loc, meta.seq_lens, D**-0.5
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
