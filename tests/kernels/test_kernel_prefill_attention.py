"""paged_prefill_attention against the torch reference: fresh prompts, cached prefixes, chunks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tandem.kernels import paged_prefill_attention
from tandem.kernels.reference import ref_paged_prefill_attention


def _query_start_loc(query_lens: list[int], device: torch.device) -> torch.Tensor:
    loc = [0]
    for n in query_lens:
        loc.append(loc[-1] + n)
    return torch.tensor(loc, dtype=torch.int32, device=device)


def _run(
    seq_lens: list[int],
    query_lens: list[int],
    head_dim: int,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    paged_kv: Callable,
    rand: Callable,
    check_close: Callable,
    device: torch.device,
) -> None:
    kv = paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    query = rand((sum(query_lens), num_heads, head_dim), dtype)
    loc = _query_start_loc(query_lens, device)
    scale = head_dim**-0.5

    out = paged_prefill_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, loc, kv.seq_lens, scale)

    expected = ref_paged_prefill_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, loc, kv.seq_lens, scale)
    check_close(out, expected)


def test_prefill_matches_reference(attention_case, paged_kv, rand, check_close, device) -> None:
    """One ragged batch mixing every kind of chunk (seq_len, query_len):

    (1, 1) one-token prompt; (bs, bs) fresh prompt of exactly one block; (2bs+5, 2bs+5) fresh
    prompt spanning several query tiles; (2bs+5, 7) chunk after a cached non-multiple prefix;
    (3bs, bs+3) chunk after a cached prefix; (3bs+1, 1) a decode row inside a prefill step.
    """
    head_dim, block_size, num_heads, num_kv_heads, dtype = attention_case
    bs = block_size
    seq_lens = [1, bs, 2 * bs + 5, 2 * bs + 5, 3 * bs, 3 * bs + 1]
    query_lens = [1, bs, 2 * bs + 5, 7, bs + 3, 1]
    _run(
        seq_lens, query_lens, head_dim, block_size, num_heads, num_kv_heads, dtype, paged_kv, rand, check_close, device
    )


@pytest.mark.parametrize(
    ("seq_lens", "query_lens"),
    [
        ([40, 7, 16], [40, 0, 16]),  # a sequence with no new tokens this step
        ([130], [130]),  # a long fresh prompt: many query tiles of one sequence
        ([150, 3], [75, 3]),  # second chunk of a chunked prefill
    ],
    ids=["empty-chunk", "long-prompt", "second-chunk"],
)
def test_prefill_ragged_edges(seq_lens: list[int], query_lens: list[int], paged_kv, rand, check_close, device) -> None:
    _run(seq_lens, query_lens, 64, 16, 6, 2, torch.float16, paged_kv, rand, check_close, device)


def test_prefill_block_size_48(paged_kv, rand, check_close, device) -> None:
    """A block size that is not a power of two: KV tiles straddle block edges."""
    _run([100, 50], [60, 50], 64, 48, 2, 2, torch.bfloat16, paged_kv, rand, check_close, device)


def test_prefill_odd_group_and_strided_query(paged_kv, rand, check_close, device) -> None:
    """7 query heads per KV head (Qwen2-7B's 28/4) padded to 8, query a view of fused QKV."""
    seq_lens, query_lens = [20, 9], [20, 4]
    kv = paged_kv(seq_lens, 16, 1, 64, torch.float32)
    qkv = rand((24, 9, 64), torch.float32)  # [tokens, 7 q heads + 1 k + 1 v, head_dim]
    query = qkv[:, :7]
    loc = _query_start_loc(query_lens, device)

    out = paged_prefill_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, loc, kv.seq_lens, 0.125)

    expected = ref_paged_prefill_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, loc, kv.seq_lens, 0.125)
    check_close(out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads"), [(128, 32, 8), (64, 16, 16), (256, 8, 1), (80, 32, 32)]
)
def test_prefill_large_gpu(
    dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int, paged_kv, rand, check_close, device
) -> None:
    seq_lens = [1, 2048, 1500, 4096, 333]
    query_lens = [1, 2048, 700, 512, 1]
    _run(seq_lens, query_lens, head_dim, 16, num_heads, num_kv_heads, dtype, paged_kv, rand, check_close, device)
