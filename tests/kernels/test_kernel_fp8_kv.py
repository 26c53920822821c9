"""FP8 KV cache in the kernels: the quantizing store and the dequantizing attention kernels
against `tandem.kernels.reference`, for the shapes of the existing kernel tests.

The store must be bit-identical to the reference (same float32 division, saturation and
round-to-nearest-even cast). The attention kernels read the same FP8 caches as the reference
and must agree within the query dtype's tolerance (`conftest.TOLERANCES`): both dequantize
`fp8 * scale` in float32 before the attention arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from tandem.kernels.reference import (
    dequantize_kv,
    quantize_kv,
    ref_paged_decode_attention,
    ref_paged_prefill_attention,
    ref_store_kv,
)

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
K_SCALE, V_SCALE = 0.015625, 0.03  # randn / 0.015625 stays below e4m3's 448 but not all (saturation)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _fp8_caches(kv, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_kv(kv.k_cache, K_SCALE, fp8), quantize_kv(kv.v_cache, V_SCALE, fp8)


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size", "dtype"),
    [
        (1, 64, 16, torch.float32),
        (2, 80, 32, torch.float16),
        (4, 128, 16, torch.bfloat16),
        (8, 128, 16, torch.float16),  # heads split over two programs
    ],
)
def test_store_kv_quantizes_like_reference(
    fmt: str, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, rand, device
) -> None:
    fp8 = FP8[fmt]
    num_blocks, num_tokens = 6, 21
    k_cache = torch.zeros((num_blocks, block_size, num_kv_heads, head_dim), dtype=fp8, device=device)
    v_cache = torch.zeros_like(k_cache)
    key = rand((num_tokens, num_kv_heads, head_dim), dtype, seed=4) * 3
    value = rand((num_tokens, num_kv_heads, head_dim), dtype, seed=5)
    key[0, 0, :4] = torch.tensor([1e4, -1e4, 7.0, 0.0], dtype=dtype)  # saturates both ways
    value[1, 0, :8] = torch.tensor([1e-5, -2e-5, 3e-5, 1e-4, -1e-4, 3e-6, 1.2e-4, 5e-7], dtype=dtype)  # subnormal
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(device)
    slots[[3, 10]] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()

    store_kv(key, value, k_cache, v_cache, slots, k_scale=K_SCALE, v_scale=V_SCALE)

    ref_store_kv(key, value, expected_k, expected_v, slots, K_SCALE, V_SCALE)
    assert torch.equal(_bits(k_cache), _bits(expected_k))
    assert torch.equal(_bits(v_cache), _bits(expected_v))
    bound = torch.finfo(fp8).max
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)[slots[0]].float()
    assert flat_k[0, :4].tolist() == [bound, -bound, float(quantize_kv(torch.tensor(7.0), K_SCALE, fp8)), 0.0]
    assert not torch.isnan(k_cache.float()).any()


def test_quantize_rule_exact_values() -> None:
    """x / scale in float32, saturated, rounded to nearest even: exact e4m3/e5m2 values."""
    x = torch.tensor([0.1, 1.0, -3.3, 500.0, 1e6, 0.0021])  # the last is subnormal in e4m3
    e4m3 = [0.203125, 2.0, -6.5, 448.0, 448.0, 0.00390625]
    assert quantize_kv(x, 0.5, torch.float8_e4m3fn).float().tolist() == e4m3
    assert quantize_kv(x, 0.5, torch.float8_e5m2).float().tolist() == [0.1875, 2.0, -7.0, 1024.0, 57344.0, 0.00390625]
    q = quantize_kv(x, 0.5, torch.float8_e4m3fn)
    assert dequantize_kv(q, 0.5, torch.float32).tolist() == [0.1015625, 1.0, -3.25, 224.0, 224.0, 0.001953125]


@pytest.mark.parametrize("fmt", list(FP8))
def test_decode_fp8_matches_reference(attention_case, fmt: str, paged_kv, rand, check_close) -> None:
    head_dim, block_size, num_heads, num_kv_heads, dtype = attention_case
    lens = [1, block_size, 2 * block_size + 5, 3 * block_size, 200]
    k_cache, v_cache = _fp8_caches(paged_kv(lens, block_size, num_kv_heads, head_dim, torch.float32), FP8[fmt])
    kv = paged_kv(lens, block_size, num_kv_heads, head_dim, dtype)
    query = rand((len(lens), num_heads, head_dim), dtype)
    scale = head_dim**-0.5

    for num_splits in (1, 3):
        out = paged_decode_attention(
            query, k_cache, v_cache, kv.block_tables, kv.seq_lens, scale,
            num_splits=num_splits, k_scale=K_SCALE, v_scale=V_SCALE,
        )  # fmt: skip
        expected = ref_paged_decode_attention(
            query, k_cache, v_cache, kv.block_tables, kv.seq_lens, scale, K_SCALE, V_SCALE
        )
        check_close(out, expected)


@pytest.mark.parametrize("fmt", list(FP8))
def test_prefill_fp8_matches_reference(attention_case, fmt: str, paged_kv, rand, check_close, device) -> None:
    head_dim, block_size, num_heads, num_kv_heads, dtype = attention_case
    bs = block_size
    seq_lens = [1, bs, 2 * bs + 5, 2 * bs + 5, 3 * bs, 3 * bs + 1]
    query_lens = [1, bs, 2 * bs + 5, 7, bs + 3, 1]
    k_cache, v_cache = _fp8_caches(paged_kv(seq_lens, bs, num_kv_heads, head_dim, torch.float32), FP8[fmt])
    kv = paged_kv(seq_lens, bs, num_kv_heads, head_dim, dtype)
    query = rand((sum(query_lens), num_heads, head_dim), dtype)
    loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    scale = head_dim**-0.5

    out = paged_prefill_attention(
        query, k_cache, v_cache, kv.block_tables, loc, kv.seq_lens, scale, k_scale=K_SCALE, v_scale=V_SCALE
    )

    expected = ref_paged_prefill_attention(
        query, k_cache, v_cache, kv.block_tables, loc, kv.seq_lens, scale, K_SCALE, V_SCALE
    )
    check_close(out, expected)


def test_fp8_cache_checks(rand, device) -> None:
    query = rand((1, 2, 64), torch.float16)
    cache = torch.zeros((2, 16, 2, 64), dtype=torch.float8_e4m3fn, device=device)
    other = torch.zeros((2, 16, 2, 64), dtype=torch.float8_e5m2, device=device)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    lens = torch.ones(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"v_cache has dtype torch.float8_e5m2 but must match torch.float8_e4m3fn"):
        paged_decode_attention(query, cache, other, tables, lens, 0.1)
    with pytest.raises(ValueError, match=r"k_scale must be a positive finite float, got 0.0"):
        paged_decode_attention(query, cache, cache, tables, lens, 0.1, k_scale=0.0)
