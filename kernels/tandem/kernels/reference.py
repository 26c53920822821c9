"""Plain torch versions of every kernel: the ground truth the tests compare against.

Written for clarity, not speed: loops over sequences, attention computed in float32, results
cast back to the input dtype. Same signatures and layouts as the Triton launchers in this
package (see each launcher's docstring for the argument contract). No argument checks: callers
are tests and the CPU path, which pass well-formed tensors.

FP8 caches (float8_e4m3fn, float8_e5m2): `quantize_kv` is the store rule and `dequantize_kv`
the read rule that the kernels implement in registers (see `tandem.kernels.cache_write`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Values to store in a `dtype` cache: x itself cast, or for FP8 `cast(clamp(x / scale))`
    computed in float32 and saturated to the format's largest finite value."""
    if dtype not in FP8_DTYPES:
        return x.to(dtype)
    bound = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-bound, bound).to(dtype)


def dequantize_kv(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache values as `dtype` (the query's): FP8 as `float32(cache) * scale`, cast."""
    if cache.dtype not in FP8_DTYPES:
        return cache
    return (cache.float() * scale).to(dtype)


def ref_store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int [num_tokens]; slot = block_id * block_size + offset; < 0: skip
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write each token's K/V into its slot of the paged cache, in place (quantized for FP8)."""
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0  # [num_tokens]
    slots = slot_mapping[keep].long()
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slots] = quantize_kv(key[keep], k_scale, k_cache.dtype)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slots] = quantize_kv(value[keep], v_scale, v_cache.dtype)


def gather_context(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # int [max_blocks]
    context_len: int,
) -> torch.Tensor:  # [context_len, num_kv_heads, head_dim]
    """Read one sequence's first `context_len` tokens of K (or V) back from the paged cache."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    blocks = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, kvh, d]
    return blocks.reshape(-1, *cache.shape[2:])[:context_len]


def _causal_attention(
    query: torch.Tensor,  # [query_len, num_heads, head_dim]
    key: torch.Tensor,  # [context_len, num_kv_heads, head_dim]
    value: torch.Tensor,  # [context_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:  # [query_len, num_heads, head_dim], float32
    """Causal attention of the last `query_len` positions of a context, in float32 (GQA)."""
    query_len, num_heads = query.shape[:2]
    context_len, num_kv_heads = key.shape[:2]
    group = num_heads // num_kv_heads
    q = query.float().transpose(0, 1)  # [num_heads, query_len, d]
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [num_heads, context_len, d]
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [num_heads, context_len, d]
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [num_heads, query_len, context_len]
    q_pos = torch.arange(context_len - query_len, context_len).unsqueeze(1)  # [query_len, 1]
    k_pos = torch.arange(context_len).unsqueeze(0)  # [1, context_len]
    scores = scores.masked_fill(k_pos.to(q.device) > q_pos.to(q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(0, 1)  # [query_len, num_heads, d]


def ref_paged_prefill_attention(
    query: torch.Tensor,  # [total_new_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [total_new_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens (the last of its context) over the cache
    (FP8 caches dequantized to the query's dtype first)."""
    out = torch.zeros_like(query)
    starts = query_start_loc.tolist()
    for i, context_len in enumerate(seq_lens.tolist()):
        begin, end = starts[i], starts[i + 1]
        if end == begin:
            continue
        key = dequantize_kv(gather_context(k_cache, block_tables[i], context_len), k_scale, query.dtype)
        value = dequantize_kv(gather_context(v_cache, block_tables[i], context_len), v_scale, query.dtype)
        out[begin:end] = _causal_attention(query[begin:end], key, value, scale).to(query.dtype)
    return out


def ref_paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Attention of one new token per sequence over its whole context: prefill with 1 token each."""
    num_seqs = query.shape[0]
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=query.device)
    return ref_paged_prefill_attention(
        query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, k_scale, v_scale
    )


def ref_pack_blocks(
    k_caches: Sequence[torch.Tensor],  # num_layers x [num_blocks, block_size, num_kv_heads, head_dim]
    v_caches: Sequence[torch.Tensor],  # num_layers x [num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor | Sequence[int],
) -> torch.Tensor:  # 1-D, layout [num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim]
    """Gather the given blocks of every layer (K then V) into one flat buffer."""
    ids = torch.as_tensor(block_ids, dtype=torch.long, device=k_caches[0].device)
    parts = [torch.stack([k[ids], v[ids]]) for k, v in zip(k_caches, v_caches)]
    return torch.stack(parts).reshape(-1)


def ref_unpack_blocks(
    buffer: torch.Tensor,  # 1-D, layout as returned by ref_pack_blocks
    k_caches: Sequence[torch.Tensor],  # num_layers x [num_blocks, block_size, num_kv_heads, head_dim]
    v_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor | Sequence[int],
) -> None:
    """Scatter a packed buffer into `block_ids` of every layer's caches, in place."""
    ids = torch.as_tensor(block_ids, dtype=torch.long, device=k_caches[0].device)
    block_shape = k_caches[0].shape[1:]
    packed = buffer.view(len(k_caches), 2, len(ids), *block_shape)
    for layer, (k, v) in enumerate(zip(k_caches, v_caches)):
        k[ids] = packed[layer, 0]
        v[ids] = packed[layer, 1]
