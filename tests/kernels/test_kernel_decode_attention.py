"""paged_decode_attention against the torch reference, with and without context splits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tandem.kernels import paged_decode_attention
from tandem.kernels.decode_attention import MAX_SPLITS, choose_num_splits
from tandem.kernels.reference import ref_paged_decode_attention


def _decode_lens(block_size: int) -> list[int]:
    # 1 token, exactly one block, a non-multiple, exactly three blocks, and a context that
    # spans several 64-token tiles so that three splits are all non-empty.
    return [1, block_size, 2 * block_size + 5, 3 * block_size, 200]


@pytest.mark.parametrize("num_splits", [1, 3], ids=["no-split", "split3"])
def test_decode_matches_reference(attention_case, num_splits: int, paged_kv, rand, check_close) -> None:
    head_dim, block_size, num_heads, num_kv_heads, dtype = attention_case
    lens = _decode_lens(block_size)
    kv = paged_kv(lens, block_size, num_kv_heads, head_dim, dtype)
    query = rand((len(lens), num_heads, head_dim), dtype)
    scale = head_dim**-0.5

    out = paged_decode_attention(
        query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale, num_splits=num_splits
    )

    expected = ref_paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    check_close(out, expected)


def test_decode_heuristic_splits_long_context(paged_kv, rand, check_close, device) -> None:
    """A lone long sequence: the default heuristic takes the split path (and stays exact)."""
    lens = [700]
    kv = paged_kv(lens, 16, 1, 64, torch.float16)
    query = rand((1, 4, 64), torch.float16)
    max_context = kv.block_tables.shape[1] * 16
    assert choose_num_splits(1, 1, max_context, device) > 1

    out = paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)

    expected = ref_paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    check_close(out, expected)


def test_decode_more_splits_than_tiles(paged_kv, rand, check_close) -> None:
    """Splits past the end of every sequence write LSE -inf and must not disturb the result."""
    kv = paged_kv([1, 20], 16, 2, 64, torch.float32)
    query = rand((2, 2, 64), torch.float32)

    out = paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, num_splits=5)

    expected = ref_paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    check_close(out, expected)


def test_decode_strided_query_view(paged_kv, rand, check_close) -> None:
    """Query as a view of a fused QKV projection (row stride > num_heads * head_dim)."""
    kv = paged_kv([5, 33], 16, 2, 64, torch.float16)
    qkv = rand((2, 8, 64), torch.float16)  # [num_seqs, q heads + k heads + v heads, head_dim]
    query = qkv[:, :4]  # [num_seqs, 4, 64], not contiguous
    assert not query.is_contiguous()

    out = paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)

    expected = ref_paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    check_close(out, expected)


@pytest.mark.parametrize(
    ("num_seqs", "num_kv_heads", "max_context", "expected"),
    [
        (1, 1, 256, 1),  # too short to split
        (1, 1, 700, 2),  # 700 // 256 = 2 splits of >= 256 tokens
        (1, 1, 16384, 16),  # CPU stand-in parallelism 8: 2 waves of 8 programs
        (64, 8, 16384, 1),  # enough (seq, kv_head) programs already
        (3, 2, 16384, 3),  # ceil(16 / 6) splits fill two waves
    ],
)
def test_choose_num_splits_cpu(num_seqs: int, num_kv_heads: int, max_context: int, expected: int) -> None:
    got = choose_num_splits(num_seqs, num_kv_heads, max_context, torch.device("cpu"))
    assert got == expected
    assert 1 <= got <= MAX_SPLITS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_decode_large_gpu(
    dtype: torch.dtype, num_splits: int | None, paged_kv: Callable, rand: Callable, check_close: Callable
) -> None:
    lens = [1, 17, 1024, 4096, 4093, 8191]
    kv = paged_kv(lens, 16, 8, 128, dtype)
    query = rand((len(lens), 32, 128), dtype)
    out = paged_decode_attention(
        query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 128**-0.5, num_splits=num_splits
    )
    expected = ref_paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 128**-0.5)
    check_close(out, expected)


@pytest.mark.parametrize("block_size", [8, 48], ids=["bs8", "bs48"])
def test_decode_block_size_not_dividing_tile(block_size: int, paged_kv, rand, check_close) -> None:
    """Blocks smaller than a tile, or straddling tile and split edges (48 is not a power of 2)."""
    lens = [3, 2 * block_size, 150]
    kv = paged_kv(lens, block_size, 2, 64, torch.float32)
    query = rand((3, 4, 64), torch.float32)

    out = paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, num_splits=2)

    expected = ref_paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    check_close(out, expected)
