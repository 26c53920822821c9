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


def _chunk_metadata(chunks: list[tuple[int, int]], num_blocks: int, seed: int) -> AttentionMetadata:
    """Chunks of (query_len, seq_len); each sequence owns distinct random blocks of the cache."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-s // BS) for _, s in chunks)
    tables = torch.zeros((len(chunks), max_blocks), dtype=torch.int32)
    slots = []
    for i, (q, s) in enumerate(chunks):
        blocks = [order.pop() for _ in range(-(-s // BS))]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots.extend(blocks[p // BS] * BS + p % BS for p in range(s - q, s))
    query_lens = [q for q, _ in chunks]
    starts = torch.zeros(len(chunks) + 1, dtype=torch.int32)
    starts[1:] = torch.tensor(query_lens).cumsum(0)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=starts,
        seq_lens=torch.tensor([s for _, s in chunks], dtype=torch.int32),
        block_tables=tables,
        query_lens=tuple(query_lens),
        seq_lens_host=tuple(s for _, s in chunks),
        block_size=BS,
    )


SHORT_CASES = {
    # verify chunks of 1 + k tokens among decode rows; chunks ending at and starting at block edges
    "mixed-verify": [(5, 37), (1, 16), (5, 32), (3, 17), (1, 9), (5, 5)],
    "one-length": [(5, 20), (5, 64), (5, 48)],
    # a long context splits the short chunks into two padded calls
    "two-buckets": [(5, 1500), (2, 40), (5, 33), (1, 50), (8, 16)],
    # a prefill chunk (attended alone) next to short chunks
    "with-prefill": [(40, 40), (5, 21), (9, 30), (1, 64), (8, 8)],
}


@pytest.mark.parametrize(("num_heads", "dtype"), [(H, torch.float32), (KVH, torch.float32), (H, torch.bfloat16)])
@pytest.mark.parametrize("case", sorted(SHORT_CASES))
def test_short_query_chunks_match_the_per_sequence_path(
    case: str, num_heads: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tandem.engine import attention_torch

    chunks = SHORT_CASES[case]
    num_blocks = sum(-(-s // BS) for _, s in chunks) + 3
    meta = _chunk_metadata(chunks, num_blocks, seed=len(case))
    g = torch.Generator().manual_seed(1)
    kv_cache = torch.randn((2, num_blocks, BS, KVH, D), generator=g).to(dtype)
    n = sum(q for q, _ in chunks)
    query, key, value = (torch.randn((n, h, D), generator=g).to(dtype) for h in (num_heads, KVH, KVH))

    plan = attention_torch.short_query_plan(meta)
    long_chunks = [i for i, (q, _) in enumerate(chunks) if q > attention_torch.SHORT_QUERY_TOKENS]
    assert [i for i, _ in plan.long_chunks] == long_chunks
    assert len(plan.buckets) == (2 if case == "two-buckets" else 1)
    out = TorchAttentionBackend().forward(query, key, value, kv_cache.clone(), meta, D**-0.5)

    monkeypatch.setattr(attention_torch, "SHORT_QUERY_TOKENS", 0)  # every chunk alone: the old path
    assert attention_torch.short_query_plan(meta).buckets == ()
    per_sequence = TorchAttentionBackend().forward(query, key, value, kv_cache.clone(), meta, D**-0.5)
    written = kv_cache.clone()
    TorchAttentionBackend().forward(query, key, value, written, meta, D**-0.5)
    expected = ref_paged_prefill_attention(
        query, written[0], written[1], meta.block_tables, meta.query_start_loc, meta.seq_lens, D**-0.5
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, per_sequence, rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def test_the_backend_builds_a_plan_once_per_metadata() -> None:
    backend = TorchAttentionBackend()
    first = _chunk_metadata([(5, 20), (1, 7)], 8, seed=0)
    second = _chunk_metadata([(5, 20), (1, 7)], 8, seed=0)
    plan = backend.short_plan(first)
    assert backend.short_plan(first) is plan
    assert backend.short_plan(second) is not plan
