"""The inner loop step shared by the decode and prefill kernels: one tile of paged KV.

Both kernels hold a tile of query rows in registers and stream the sequence's context through
it, BLOCK_N tokens at a time, with the online softmax of FlashAttention-2 (Dao, 2023):

    s     = (q @ k^T) * scale * log2(e)           # [ROWS, BLOCK_N], float32
    m_new = max(m, rowmax(s))
    p     = exp2(s - m_new)
    l     = l * exp2(m - m_new) + rowsum(p)
    acc   = acc * exp2(m - m_new) + p @ v         # [ROWS, BLOCK_D], float32

Paged gather (vLLM PagedAttention, Kwon et al., 2023): context token `pos` lives in block
`block_table[pos // block_size]` at offset `pos % block_size`. Each token's row of head_dim
elements is contiguous, so a tile is BLOCK_N dense row loads whatever the block size: one
block per token row, not per tile, so BLOCK_N need not divide or equal block_size.

FP8 cache (DEQUANT): a K/V tile is loaded as fp8 and dequantized in registers, `x * scale` in
float32, then cast to the query's dtype for the dot (vLLM's Triton unified attention does the
same), so the cache's memory traffic is one byte per element.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_kv_tile(
    q,  # [ROWS, BLOCK_D] query tile (already cast for the dot)
    q_pos,  # int32 [ROWS] position of each query row (used when CAUSAL)
    m_i,  # float32 [ROWS] running max (log2 domain)
    l_i,  # float32 [ROWS] running denominator
    acc,  # float32 [ROWS, BLOCK_D] running numerator
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,
    block_table_ptr,  # int32 [max_blocks], this sequence's row of block_tables
    kv_head,
    start_n,  # first context position of this tile
    end_n,  # one past the last context position any row may read
    block_size,
    scale_log2,  # softmax scale * log2(e)
    k_scale,  # float32 FP8 dequantization scale of K (used when DEQUANT)
    v_scale,  # float32 FP8 dequantization scale of V (used when DEQUANT)
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DEQUANT: tl.constexpr,  # the cache is FP8: x = float32(cache) * scale, cast to q's dtype
):
    """Fold context tokens [start_n, min(start_n + BLOCK_N, end_n)) into (m_i, l_i, acc)."""
    pos = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    pos_mask = pos < end_n
    dims = tl.arange(0, BLOCK_D)
    block = tl.load(block_table_ptr + pos // block_size, mask=pos_mask, other=0).to(tl.int64)
    row = block * block_size + pos % block_size  # [BLOCK_N] slot of each token, int64
    kv_offsets = (row[:, None] * NUM_KV_HEADS + kv_head) * HEAD_DIM + dims[None, :]
    kv_mask = pos_mask[:, None] & (dims < HEAD_DIM)[None, :]  # [BLOCK_N, BLOCK_D]

    k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if DEQUANT:
        k = (k.to(tl.float32) * k_scale).to(q.dtype)
    if UPCAST_DOT:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [ROWS, BLOCK_N]
    if CAUSAL:
        s = tl.where(pos_mask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
    else:
        s = tl.where(pos_mask[None, :], s, float("-inf"))

    # Every row sees at least one unmasked key in its first tile (position 0 for prefill, the
    # split's first token for decode), so m_new is finite and exp2 never sees inf - inf.
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [ROWS]
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [ROWS, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, 1)

    v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if DEQUANT:
        v = (v.to(tl.float32) * v_scale).to(q.dtype)
    p = p.to(v.dtype)
    if UPCAST_DOT:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def context_tile_size(block_d: int, element_size: int) -> int:
    """BLOCK_N, context tokens per KV tile: one K tile of at most 16 KiB, between 16 and 64.

    Software pipelining keeps ~3 K and V tiles in shared memory, so this bound keeps every
    variant (up to float32 with head_dim 256) under the 99 KiB of sm_86/sm_89 GPUs.
    """
    return max(16, min(64, 16384 // (block_d * element_size)))
