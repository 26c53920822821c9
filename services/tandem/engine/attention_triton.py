"""Triton attention over the paged KV cache: the default backend on CUDA.

Per layer and step: `store_kv` writes the step's new K/V into its slots, then one attention
kernel reads each sequence's whole context back from the cache. A pure decode step (one new
token per sequence) uses the GQA-grouped, split-context decode kernel; any step with a
prefill chunk uses the variable-length causal prefill kernel for the whole batch (decode
rows are chunks of length 1 there).

The kernels need CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the
kernels were imported (tests only: the interpreter is orders of magnitude slower).
"""

from __future__ import annotations

import torch

from tandem.engine.attention import AttentionMetadata
from tandem.kernels import paged_decode_attention, paged_prefill_attention, store_kv


class TritonAttentionBackend:
    """Stateless; the KV cache belongs to the engine's KVCache and is mutated in place."""

    name = "triton"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        kv_scale: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        # kv_cache[0] / kv_cache[1] of a contiguous 5-D cache are contiguous 4-D views.
        k_cache = kv_cache[0]  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache = kv_cache[1]
        k_scale, v_scale = kv_scale  # used by FP8 caches only (quantize on store, dequantize on read)
        store_kv(key, value, k_cache, v_cache, meta.slot_mapping, k_scale=k_scale, v_scale=v_scale)
        if meta.is_decode_only:
            return paged_decode_attention(
                query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, k_scale=k_scale, v_scale=v_scale
            )
        return paged_prefill_attention(
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            k_scale=k_scale,
            v_scale=v_scale,
        )
