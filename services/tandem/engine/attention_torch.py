"""Plain torch attention over the paged KV cache: the CPU default and the kernels' oracle.

Decode-only steps are vectorised: each sequence's blocks are gathered into a padded
`[num_seqs, max_context, num_kv_heads, head_dim]` tensor and one masked
`scaled_dot_product_attention` covers the batch. Sequences are first grouped by similar length
(`AttentionMetadata.length_buckets`), one padded call per group, so that one long prompt
joining a batch of short ones does not make every sequence gather its length. Steps with prefill chunks attend per
sequence with a causal mask offset by the cached context.

FP8 cache: the store quantizes with the layer's scales (`quantize_kv`, the kernels' rule) and
every read dequantizes the gathered blocks to the query's dtype (`dequantize_kv`) before the
attention arithmetic, as the Triton kernels do in registers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.engine.attention import AttentionMetadata
from tandem.kernels.reference import FP8_DTYPES, dequantize_kv, gather_context, quantize_kv


class TorchAttentionBackend:
    name = "torch"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        kv_scale: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
        stored_k = quantize_kv(key, kv_scale[0], kv_cache.dtype)
        stored_v = quantize_kv(value, kv_scale[1], kv_cache.dtype)
        if kv_cache.dtype in FP8_DTYPES:  # index_copy_ has no CPU fp8 kernel: copy the bytes
            flat, stored_k, stored_v = flat.view(torch.uint8), stored_k.view(torch.uint8), stored_v.view(torch.uint8)
        flat[0].index_copy_(0, meta.slot_mapping, stored_k)
        flat[1].index_copy_(0, meta.slot_mapping, stored_v)
        if meta.is_decode_only:
            return self._decode(query, kv_cache, meta, scale, kv_scale)
        return self._varlen(query, kv_cache, meta, scale, kv_scale)

    @staticmethod
    def _decode(
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: tuple[float, float],
    ) -> torch.Tensor:
        buckets = meta.length_buckets
        if len(buckets) == 1:
            return _decode_padded(
                query, kv_cache, meta.block_tables, meta.seq_lens, max(meta.seq_lens_host), scale, kv_scale
            )
        out = torch.empty_like(query)
        for index, block_tables, seq_lens, max_len in meta.bucket_tensors:
            out[index] = _decode_padded(query[index], kv_cache, block_tables, seq_lens, max_len, scale, kv_scale)
        return out

    @staticmethod
    def _varlen(
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: tuple[float, float],
    ) -> torch.Tensor:
        rep = query.shape[1] // kv_cache.shape[3]  # query heads per KV head
        out = torch.empty_like(query)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens_host)):
            k = gather_context(kv_cache[0], meta.block_tables[i], seq_len)  # [seq_len, kv_heads, head_dim]
            v = gather_context(kv_cache[1], meta.block_tables[i], seq_len)
            k = dequantize_kv(k, kv_scale[0], query.dtype)
            v = dequantize_kv(v, kv_scale[1], query.dtype)
            k = k.transpose(0, 1).repeat_interleave(rep, dim=0)  # [num_heads, seq_len, head_dim]
            v = v.transpose(0, 1).repeat_interleave(rep, dim=0)
            q = query[start : start + q_len].transpose(0, 1)  # [num_heads, q_len, head_dim]
            if q_len == 1:
                o = F.scaled_dot_product_attention(q, k, v, scale=scale)
            else:
                # query row r sits at position seq_len - q_len + r and sees positions <= it
                rows = torch.arange(q_len, device=query.device)[:, None] + (seq_len - q_len)
                mask = torch.arange(seq_len, device=query.device)[None, :] <= rows
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[start : start + q_len] = o.transpose(0, 1)
            start += q_len
        return out


def _decode_padded(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_len: int,
    scale: float,
    kv_scale: tuple[float, float],
) -> torch.Tensor:
    """One masked attention call for decode queries `[n, num_heads, head_dim]` whose contexts
    (`seq_lens`, longest `max_len`) are gathered from the paged cache, padded to `max_len`."""
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    max_blocks = -(-max_len // block_size)
    tables = block_tables[:, :max_blocks].long()  # [n, max_blocks]
    k = kv_cache[0][tables].view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    v = kv_cache[1][tables].view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    k = dequantize_kv(k, kv_scale[0], query.dtype)
    v = dequantize_kv(v, kv_scale[1], query.dtype)
    k = k.transpose(1, 2)  # [n, num_kv_heads, ctx, head_dim]
    v = v.transpose(1, 2)
    ctx = torch.arange(max_blocks * block_size, device=query.device)
    mask = ctx[None, :] < seq_lens[:, None]  # [n, ctx]
    q = query.unsqueeze(2)  # [n, num_heads, 1, head_dim]
    # enable_gqa: query head h reads KV head h // (num_heads // num_kv_heads), as
    # repeat_interleave would lay it out, without materialising the repeated K and V.
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=num_heads != num_kv_heads
    )
    return out.squeeze(2)
