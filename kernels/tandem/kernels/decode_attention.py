"""Paged decode attention: one new token per sequence over its whole paged context.

Decode is memory-bound: every step reads each sequence's entire KV once. Two ideas keep the
GPU busy and the reads minimal:

1. GQA grouping. One program serves all `num_heads / num_kv_heads` query heads that share a KV
   head, so each K/V tile is loaded once per group instead of once per query head. The group
   is padded to at least 16 rows so that q @ k^T and p @ v run as `tl.dot` (tensor cores).
2. Split context (flash-decoding, Dao et al., 2023). With few sequences, (seq, kv_head)
   programs alone cannot fill the GPU, so the context is cut into `num_splits` chunks handled by
   separate programs. Each writes a partial output normalised by its own softmax sum plus the
   log-sum-exp (LSE) of its scores; a second kernel rescales and sums the partials.
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

MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it adds
MAX_SPLITS = 64
_CPU_PARALLELISM = 8  # stand-in for the SM count when the interpreter runs on CPU


@triton.jit
def _decode_kernel(
    query_ptr,  # [num_seqs, num_heads, head_dim], head_dim stride 1
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,
    block_tables_ptr,  # int32 [num_seqs, max_blocks], contiguous
    seq_lens_ptr,  # int32 [num_seqs]
    out_ptr,  # [num_seqs, num_heads, head_dim], contiguous (written when not IS_SPLIT)
    partial_out_ptr,  # float32 [num_seqs, num_heads, num_splits, head_dim] (IS_SPLIT)
    partial_lse_ptr,  # float32 [num_seqs, num_heads, num_splits] (IS_SPLIT), log2 domain
    scale_log2,
    k_scale,  # float32 FP8 dequantization scales (used when DEQUANT)
    v_scale,
    stride_query_seq,
    stride_query_head,
    max_blocks,
    block_size,
    num_splits,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr,  # query heads per KV head, padded to a power of two >= 16
    BLOCK_N: tl.constexpr,  # context tokens per tile
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two >= 16
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DEQUANT: tl.constexpr,  # FP8 caches, dequantized in attend_kv_tile
):
    """Attention of one (sequence, KV head group, context split) with an online softmax.

    Grid: (num_seqs, num_kv_heads, num_splits). Split `j` covers context positions
    [j * chunk, min((j + 1) * chunk, seq_len)) with chunk = cdiv(seq_len, num_splits) rounded
    up to BLOCK_N; a split past the end of a short sequence writes LSE = -inf and weight 0.
    Algorithm: vLLM paged attention v2 + flash-decoding, FlashAttention-2 inner loop.
    """
    QUERIES_PER_KV: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    tl.static_assert(BLOCK_G >= 16)  # tl.dot needs >= 16 in every dimension
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    group = tl.arange(0, BLOCK_G)  # [BLOCK_G]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    heads = kv_head * QUERIES_PER_KV + group  # [BLOCK_G]
    row_mask = (group < QUERIES_PER_KV)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(
        query_ptr + seq.to(tl.int64) * stride_query_seq + heads[:, None] * stride_query_head + dims[None, :],
        mask=row_mask,
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * max_blocks
    for start_n in range(start, end, BLOCK_N):
        m_i, l_i, acc = attend_kv_tile(
            q,
            group,
            m_i,
            l_i,
            acc,
            k_cache_ptr,
            v_cache_ptr,
            block_table_ptr,
            kv_head,
            start_n,
            end,
            block_size,
            scale_log2,
            k_scale,
            v_scale,
            NUM_KV_HEADS,
            HEAD_DIM,
            BLOCK_N,
            BLOCK_D,
            False,
            UPCAST_DOT,
            DOT_PRECISION,
            DEQUANT,
        )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # empty split (or seq_len 0): output 0, not NaN
    out = acc / l_safe[:, None]  # [BLOCK_G, BLOCK_D]
    head_rows = seq.to(tl.int64) * NUM_HEADS + heads  # [BLOCK_G] row in [num_seqs * num_heads]
    if IS_SPLIT:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # -inf: empty split
        part_rows = head_rows * num_splits + split  # [BLOCK_G]
        tl.store(partial_lse_ptr + part_rows, lse, mask=group < QUERIES_PER_KV)
        tl.store(partial_out_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :], out, mask=row_mask)
    else:
        tl.store(
            out_ptr + head_rows[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask
        )


@triton.jit
def _reduce_splits_kernel(
    partial_out_ptr,  # float32 [num_seqs, num_heads, num_splits, head_dim]
    partial_lse_ptr,  # float32 [num_seqs, num_heads, num_splits], log2 domain
    out_ptr,  # [num_seqs, num_heads, head_dim], contiguous
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of two
    BLOCK_D: tl.constexpr,
):
    """Combine the split partials of one (sequence, head): out = sum_j w_j o_j / sum_j w_j.

    w_j = exp2(lse_j - max_j lse_j), so the largest weight is 1 and nothing overflows
    (flash-decoding's reduction step). Grid: (num_seqs * num_heads,).
    """
    row = tl.program_id(0).to(tl.int64)  # seq * num_heads + head
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    lse = tl.load(partial_lse_ptr + row * num_splits + splits, mask=split_mask, other=float("-inf"))  # [BLOCK_S]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty
    weight = tl.where(split_mask, tl.exp2(lse - lse_max), 0.0)  # [BLOCK_S]
    mask = split_mask[:, None] & (dims < HEAD_DIM)[None, :]
    partial = tl.load(
        partial_out_ptr + (row * num_splits + splits[:, None]) * HEAD_DIM + dims[None, :], mask=mask, other=0.0
    )  # [BLOCK_S, BLOCK_D]
    total = tl.sum(weight, 0)
    out = tl.sum(partial * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Heuristic split count: enough programs for ~2 waves, >= MIN_TOKENS_PER_SPLIT per split.

    `max_context_len` is the block-table capacity (max_blocks * block_size), an upper bound
    known on the host, so the launcher never syncs to read `seq_lens`.
    """
    if device.type == "cuda":
        parallelism = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        parallelism = _CPU_PARALLELISM
    wanted = math.ceil(2 * parallelism / max(1, num_seqs * num_kv_heads))
    by_length = max_context_len // MIN_TOKENS_PER_SPLIT
    return max(1, min(wanted, by_length, MAX_SPLITS))


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    scale: float,
    *,
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim], dtype of query
    """Attention of each sequence's newest token over its `seq_lens[i]` cached tokens.

    The new token's K/V must already be stored (`store_kv`). `num_heads` must be a multiple of
    `num_kv_heads` (GQA; query head h reads KV head h // (num_heads // num_kv_heads)).
    `num_splits=None` picks the split count by `choose_num_splits`; 1 disables the
    split-context path, larger values force it (tests cover both). The caches are in the
    query's dtype, or FP8 (both one format): then K/V are read as `fp8 * k_scale/v_scale`.
    """
    check_tensor("query", query, 3, FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, 4, KV_CACHE_DTYPES)
    check_tensor("v_cache", v_cache, 4, KV_CACHE_DTYPES)
    check_tensor("block_tables", block_tables, 2, (torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,))
    dequant = check_kv_cache_dtype(query.dtype, k_scale, v_scale, k_cache=k_cache, v_cache=v_cache)
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    check_shape("k_cache", k_cache, (num_blocks, block_size, num_kv_heads, head_dim))
    check_shape("v_cache", v_cache, k_cache.shape)
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"query has {num_heads} heads, not a multiple of the caches' {num_kv_heads} KV heads")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    check_shape("seq_lens", seq_lens, (num_seqs,))
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    check_rows_contiguous("query", query)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        check_contiguous(name, t)
    device = check_device(
        _decode_kernel, query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens
    )

    out = torch.empty((num_seqs, num_heads, head_dim), dtype=query.dtype, device=device)
    if num_seqs == 0:
        return out
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_blocks * block_size, device)
    is_split = num_splits > 1
    if is_split:
        partial_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        partial_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=device)
    else:  # unused by the kernel; any float32 tensor satisfies the signature
        partial_out = partial_lse = out.new_empty(0, dtype=torch.float32)

    block_d = head_dim_tile(head_dim)
    block_g = max(16, triton.next_power_of_2(num_heads // num_kv_heads))
    block_n = context_tile_size(block_d, query.element_size())
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        partial_out,
        partial_lse,
        scale * math.log2(math.e),
        k_scale,
        v_scale,
        query.stride(0),
        query.stride(1),
        max_blocks,
        block_size,
        num_splits,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        IS_SPLIT=is_split,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        UPCAST_DOT=dot_upcast(_decode_kernel, query.dtype),
        DOT_PRECISION=dot_precision(query.dtype),
        DEQUANT=dequant,
    )
    if is_split:
        _reduce_splits_kernel[(num_seqs * num_heads,)](
            partial_out,
            partial_lse,
            out,
            num_splits,
            HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
        )
    return out
