"""Paged prefill attention: causal attention for a batch of variable-length query chunks.

Covers a fresh prompt, a prompt whose prefix hit the prefix cache, and one chunk of a chunked
prefill alike: sequence i's `query_len` new tokens are the last tokens of its `seq_len`-long
context, and every key (cached prefix and new tokens, already stored by `store_kv`) is read
from the paged cache.

Work decomposition (vLLM's Triton unified attention): the flattened batch is cut into tiles
of BLOCK_Q query tokens that never straddle two sequences. Sequence i's tiles start at global
tile index `query_start_loc[i] // BLOCK_Q + i`, so the grid size `cdiv(total, BLOCK_Q) +
num_seqs` is known on the host without reading lengths from the device, and each program finds
its sequence by binary search. A tile's rows are (token, query head) pairs of the BLOCK_G
query heads that share one KV head (GQA): BLOCK_M = BLOCK_Q * BLOCK_G rows read each K/V tile
once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tandem.kernels.attention_tile import attend_kv_tile, context_tile_size
from tandem.kernels.launch_checks import (
    FLOAT_DTYPES,
    KV_CACHE_DTYPES,
    check_contiguous,
    check_device,
    check_kv_cache_dtype,
    check_rows_contiguous,
    check_shape,
    check_tensor,
    dot_precision,
    dot_upcast,
    head_dim_tile,
)


@triton.jit
def _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i with `query_start_loc[i] // BLOCK_Q + i <= tile` (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    query_ptr,  # [total_tokens, num_heads, head_dim], head_dim stride 1
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,
    block_tables_ptr,  # int32 [num_seqs, max_blocks], contiguous
    query_start_loc_ptr,  # int32 [num_seqs + 1]
    seq_lens_ptr,  # int32 [num_seqs]
    out_ptr,  # [total_tokens, num_heads, head_dim], contiguous
    scale_log2,
    k_scale,  # float32 FP8 dequantization scales (used when DEQUANT)
    v_scale,
    stride_query_token,
    stride_query_head,
    num_seqs,
    max_blocks,
    block_size,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per tile
    BLOCK_G: tl.constexpr,  # query heads per KV head, padded to a power of two
    BLOCK_N: tl.constexpr,  # context tokens per KV tile
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two >= 16
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DEQUANT: tl.constexpr,  # FP8 caches, dequantized in attend_kv_tile
):
    """Causal FlashAttention-2 forward of one query tile against one sequence's paged KV.

    Grid: (cdiv(total_tokens, BLOCK_Q) + num_seqs, num_kv_heads); programs whose tile lies past
    the end of their sequence exit at once. Row r of the tile is query token
    `tile_start + r // BLOCK_G` and head `kv_head * QUERIES_PER_KV + r % BLOCK_G`; query token
    at position p attends to context positions 0..p. Keys are streamed up to the tile's last
    query position only, so a chunk never reads its own future.
    """
    QUERIES_PER_KV: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
    tl.static_assert(BLOCK_M >= 16)  # tl.dot needs >= 16 in every dimension
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_seq(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    first_token = (tile - (query_start // BLOCK_Q + seq)) * BLOCK_Q  # within the sequence
    if first_token >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_before = seq_len - query_len  # tokens cached before this chunk

    rows = tl.arange(0, BLOCK_M)
    tokens = first_token + rows // BLOCK_G  # [BLOCK_M] token index within the chunk
    group = rows % BLOCK_G
    heads = kv_head * QUERIES_PER_KV + group  # [BLOCK_M]
    dims = tl.arange(0, BLOCK_D)
    row_mask = ((tokens < query_len) & (group < QUERIES_PER_KV))[:, None] & (dims < HEAD_DIM)[
        None, :
    ]  # [BLOCK_M, BLOCK_D]
    token_rows = (query_start + tokens).to(tl.int64)  # [BLOCK_M] row in the flattened batch
    q = tl.load(
        query_ptr + token_rows[:, None] * stride_query_token + heads[:, None] * stride_query_head + dims[None, :],
        mask=row_mask,
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if UPCAST_DOT:
        q = q.to(tl.float32)
    q_pos = context_before + tokens  # [BLOCK_M] context position of each row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * max_blocks
    # Keys up to the last query of this tile (position 0 is visible to every row, padding
    # rows included, so no row's softmax is empty).
    kv_end = tl.minimum(seq_len, context_before + first_token + BLOCK_Q)
    for start_n in range(0, kv_end, BLOCK_N):
        m_i, l_i, acc = attend_kv_tile(
            q,
            q_pos,
            m_i,
            l_i,
            acc,
            k_cache_ptr,
            v_cache_ptr,
            block_table_ptr,
            kv_head,
            start_n,
            kv_end,
            block_size,
            scale_log2,
            k_scale,
            v_scale,
            NUM_KV_HEADS,
            HEAD_DIM,
            BLOCK_N,
            BLOCK_D,
            True,
            UPCAST_DOT,
            DOT_PRECISION,
            DEQUANT,
        )

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (token_rows[:, None] * NUM_HEADS + heads[:, None]) * HEAD_DIM + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask,
    )


def paged_prefill_attention(
    query: torch.Tensor,  # [total_new_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    scale: float,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [total_new_tokens, num_heads, head_dim], dtype of query
    """Causal attention of each sequence's new tokens over its whole paged context.

    Sequence i owns query rows `query_start_loc[i]:query_start_loc[i+1]`; they are the last
    tokens of its `seq_lens[i]`-long context and their K/V is already stored. Earlier context
    (prefix-cache hits, previous prefill chunks) is read from the cache through `block_tables`.
    `query_start_loc[-1]` must equal `total_new_tokens`, and `query_len <= seq_len` per
    sequence (not checked on the device: that would cost a sync). The caches are in the
    query's dtype, or FP8 (both one format): then K/V are read as `fp8 * k_scale/v_scale`.
    """
    check_tensor("query", query, 3, FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, 4, KV_CACHE_DTYPES)
    check_tensor("v_cache", v_cache, 4, KV_CACHE_DTYPES)
    check_tensor("block_tables", block_tables, 2, (torch.int32,))
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    dequant = check_kv_cache_dtype(query.dtype, k_scale, v_scale, k_cache=k_cache, v_cache=v_cache)
    total_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    num_seqs = seq_lens.shape[0]
    check_shape("k_cache", k_cache, (num_blocks, block_size, num_kv_heads, head_dim))
    check_shape("v_cache", v_cache, k_cache.shape)
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"query has {num_heads} heads, not a multiple of the caches' {num_kv_heads} KV heads")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    check_shape("query_start_loc", query_start_loc, (num_seqs + 1,))
    check_rows_contiguous("query", query)
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("block_tables", block_tables),
        ("query_start_loc", query_start_loc),
        ("seq_lens", seq_lens),
    ):
        check_contiguous(name, t)
    device = check_device(
        _prefill_kernel,
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
    )

    out = torch.empty((total_tokens, num_heads, head_dim), dtype=query.dtype, device=device)
    if total_tokens == 0 or num_seqs == 0:
        return out
    block_d = head_dim_tile(head_dim)
    block_g = triton.next_power_of_2(num_heads // num_kv_heads)
    block_m = max(block_g, 64 if block_d <= 128 else 32)  # rows per tile
    block_q = block_m // block_g
    block_n = context_tile_size(block_d, query.element_size())
    grid = (triton.cdiv(total_tokens, block_q) + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        scale * math.log2(math.e),
        k_scale,
        v_scale,
        query.stride(0),
        query.stride(1),
        num_seqs,
        block_tables.shape[1],
        block_size,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_Q=block_q,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        UPCAST_DOT=dot_upcast(_prefill_kernel, query.dtype),
        DOT_PRECISION=dot_precision(query.dtype),
        DEQUANT=dequant,
    )
    return out
