"""store_kv against the torch reference: an exact copy, so results must be bit-identical."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import store_kv
from tandem.kernels.reference import ref_store_kv


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size", "dtype", "slot_dtype"),
    [
        (1, 64, 16, torch.float32, torch.int64),
        (2, 80, 32, torch.float16, torch.int32),
        (4, 128, 16, torch.bfloat16, torch.int64),
        (2, 256, 32, torch.float32, torch.int32),
        (8, 128, 16, torch.float16, torch.int64),  # heads split over two programs (2048 elems)
    ],
)
def test_store_kv_matches_reference(
    num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, slot_dtype: torch.dtype, rand, device
) -> None:
    num_blocks, num_tokens = 6, 21
    k_cache = rand((num_blocks, block_size, num_kv_heads, head_dim), dtype, seed=2)
    v_cache = rand((num_blocks, block_size, num_kv_heads, head_dim), dtype, seed=3)
    key = rand((num_tokens, num_kv_heads, head_dim), dtype, seed=4)
    value = rand((num_tokens, num_kv_heads, head_dim), dtype, seed=5)
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[3, 10]] = -1  # padding tokens: skipped
    slots = slots.to(slot_dtype).to(device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()

    store_kv(key, value, k_cache, v_cache, slots)

    ref_store_kv(key, value, expected_k, expected_v, slots)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_store_kv_from_fused_qkv_view(rand, device) -> None:
    """key/value as strided views of a [tokens, q + k + v heads, head_dim] projection."""
    qkv = rand((5, 6, 64), torch.float16)  # 4 query heads, 1 key head, 1 value head
    key, value = qkv[:, 4:5], qkv[:, 5:6]
    k_cache = torch.zeros((2, 16, 1, 64), dtype=torch.float16, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 17, 31, 5, 16], dtype=torch.int64, device=device)

    store_kv(key, value, k_cache, v_cache, slots)

    flat_k = k_cache.view(32, 1, 64)
    flat_v = v_cache.view(32, 1, 64)
    assert torch.equal(flat_k[slots], key)
    assert torch.equal(flat_v[slots], value)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not flat_k[untouched.to(device)].any() and not flat_v[untouched.to(device)].any()


def test_store_kv_no_tokens(device) -> None:
    cache = torch.zeros((1, 16, 1, 64), device=device)
    empty = torch.empty((0, 1, 64), device=device)
    store_kv(empty, empty, cache, cache.clone(), torch.empty(0, dtype=torch.int64, device=device))
    assert not cache.any()
