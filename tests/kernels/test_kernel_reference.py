"""The references themselves agree with torch's own attention on un-paged tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.kernels.reference import (
    ref_paged_decode_attention,
    ref_paged_prefill_attention,
    ref_store_kv,
)


def _paged(keys: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Store a contiguous [context, kvh, d] context into reversed blocks of a fresh cache."""
    context_len = keys.shape[0]
    num_blocks = -(-context_len // block_size)
    cache = torch.zeros((num_blocks, block_size, *keys.shape[1:]), dtype=keys.dtype)
    table = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32)
    slots = table.long().repeat_interleave(block_size) * block_size + torch.arange(block_size).repeat(num_blocks)
    ref_store_kv(keys, keys, cache, cache.clone(), slots[:context_len])
    return cache, table.unsqueeze(0)


def test_reference_prefill_equals_causal_sdpa_with_gqa() -> None:
    gen = torch.Generator().manual_seed(0)
    context_len, query_len, heads, kv_heads, dim = 37, 12, 6, 2, 32
    keys = torch.randn((context_len, kv_heads, dim), generator=gen)
    values = torch.randn((context_len, kv_heads, dim), generator=gen)
    query = torch.randn((query_len, heads, dim), generator=gen)
    k_cache, table = _paged(keys, 16)
    v_cache, _ = _paged(values, 16)
    seq_lens = torch.tensor([context_len], dtype=torch.int32)
    loc = torch.tensor([0, query_len], dtype=torch.int32)

    got = ref_paged_prefill_attention(query, k_cache, v_cache, table, loc, seq_lens, 0.2)

    # query row r sits at position context_len - query_len + r
    mask = torch.arange(context_len)[None, :] <= torch.arange(query_len)[:, None] + (context_len - query_len)
    expected = F.scaled_dot_product_attention(
        query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, scale=0.2, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(got, expected)

    decode = ref_paged_decode_attention(query[-1:], k_cache, v_cache, table, seq_lens, 0.2)
    torch.testing.assert_close(decode, expected[-1:])
