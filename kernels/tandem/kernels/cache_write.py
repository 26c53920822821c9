"""Cache write: scatter a step's new K/V rows into their slots of the paged KV cache.

With an FP8 cache (float8_e4m3fn or float8_e5m2) the write quantizes, as vLLM's
`reshape_and_cache_flash` with `kv_cache_dtype=fp8`: `cache = cast(clamp(x / scale, -max, max))`
with x upcast to float32, one scale per layer for K and one for V, round-to-nearest-even on the
cast and saturation to the format's largest finite value (`max`: 448 for e4m3, 57344 for e5m2).
The division (not a multiply by 1/scale) keeps the torch backend and reference bit-identical.

Rounding is done in float32 registers (`_round_to_fp8`) before the cast, which is then exact.
Reason: Triton's interpreter (3.6 to 3.9, TRITON_INTERPRET=1) rounds a float32 -> fp8 cast
without carrying into the exponent (127.6 -> 64 instead of 128 in e4m3), so the cast alone
is wrong there. On the GPU the explicit rounding costs a few integer ops in a memory-bound
kernel, and the code path is the same in both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.launch_checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    KV_CACHE_DTYPES,
    check_contiguous,
    check_device,
    check_kv_cache_dtype,
    check_rows_contiguous,
    check_same_dtype,
    check_shape,
    check_tensor,
    fp8_max,
    head_dim_tile,
)

# Elements of one program's [BLOCK_H, BLOCK_D] tile: 2048 keeps register use moderate.
_TILE_ELEMENTS = 2048


@triton.jit
def _round_to_fp8(y, MANTISSA_BITS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUBNORMAL_MAGIC: tl.constexpr):
    """Round float32 `y` (already within the format's range) to the nearest value with
    MANTISSA_BITS mantissa bits, ties to even, as an IEEE cast to the fp8 format would.

    Normal range (|y| >= MIN_NORMAL = 2^emin): add half an ulp (minus one, plus the kept
    lowest bit: ties to even) to the float32 bit pattern and clear the dropped bits; a carry
    moves into the exponent correctly. Subnormal range: a fixed quantum q = 2^(emin -
    MANTISSA_BITS), rounded by adding and subtracting SUBNORMAL_MAGIC = 2^23 q in float32
    (whose ulp there is q).
    """
    DROP: tl.constexpr = 23 - MANTISSA_BITS
    bits = y.to(tl.int32, bitcast=True)
    rounded = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & ~((1 << DROP) - 1)
    normal = rounded.to(tl.float32, bitcast=True)
    tiny = (tl.abs(y) + SUBNORMAL_MAGIC) - SUBNORMAL_MAGIC
    tiny = tl.where(y < 0, -tiny, tiny)
    return tl.where(tl.abs(y) >= MIN_NORMAL, normal, tiny)


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], head_dim stride 1
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], head_dim stride 1
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache_ptr,  # same shape and strides as k_cache
    slot_mapping_ptr,  # int32/int64 [num_tokens]
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    block_size,
    k_scale,  # float32 K scale (used when QUANTIZE)
    v_scale,  # float32 V scale (used when QUANTIZE)
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # kv heads per program (power of two)
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
    QUANTIZE: tl.constexpr,  # FP8 cache: store cast(clamp(x / scale, -FP8_MAX, FP8_MAX))
    FP8_MAX: tl.constexpr,
    MANTISSA_BITS: tl.constexpr,  # 3 for e4m3, 2 for e5m2
    MIN_NORMAL: tl.constexpr,  # smallest normal value: 2^-6 for e4m3, 2^-14 for e5m2
    SUBNORMAL_MAGIC: tl.constexpr,  # 2^23 * the subnormal quantum (see _round_to_fp8)
):
    """Copy one token's K and V (BLOCK_H heads of it) into slot `slot_mapping[token]`.

    Grid: (num_tokens, cdiv(num_kv_heads, BLOCK_H)). A negative slot means "do not store"
    (padding tokens) and the program exits. The cache offset is computed in int64 because
    `slot * num_kv_heads * head_dim` overflows int32 on large pools. Same algorithm as vLLM's
    `reshape_and_cache_flash`.
    """
    token = tl.program_id(0).to(tl.int64)
    head_tile = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size

    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]  # [BLOCK_H, BLOCK_D]

    key = tl.load(key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
    value = tl.load(
        value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :], mask=mask
    )

    if QUANTIZE:
        key = tl.clamp(key.to(tl.float32) / k_scale, -FP8_MAX, FP8_MAX)
        value = tl.clamp(value.to(tl.float32) / v_scale, -FP8_MAX, FP8_MAX)
        key = _round_to_fp8(key, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_MAGIC).to(k_cache_ptr.dtype.element_ty)
        value = _round_to_fp8(value, MANTISSA_BITS, MIN_NORMAL, SUBNORMAL_MAGIC).to(v_cache_ptr.dtype.element_ty)

    # Contiguous cache: slot (block, offset) starts at (block * block_size + offset) rows.
    cache_offsets = ((block * block_size + offset) * NUM_KV_HEADS + heads[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(k_cache_ptr + cache_offsets, key, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, value, mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int32/int64 [num_tokens]
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write `key`/`value` into the paged caches at `slot_mapping`, in place.

    `slot = block_id * block_size + offset`; a negative slot skips its token. The caches must be
    contiguous and share the dtype of `key`/`value`, or both be one FP8 dtype: then the write
    quantizes with `k_scale`/`v_scale` (module doc; ignored otherwise). `key`/`value` need only a unit stride on
    head_dim (views of a fused QKV projection are fine). Slots are not range-checked (that would
    cost a device sync per layer); the engine's block pool owns their validity.
    """
    check_tensor("key", key, 3, FLOAT_DTYPES)
    check_tensor("value", value, 3, FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, 4, KV_CACHE_DTYPES)
    check_tensor("v_cache", v_cache, 4, KV_CACHE_DTYPES)
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    check_same_dtype(key.dtype, value=value)
    quantize = check_kv_cache_dtype(key.dtype, k_scale, v_scale, k_cache=k_cache, v_cache=v_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    num_blocks, block_size = k_cache.shape[:2]
    check_shape("value", value, key.shape)
    check_shape("k_cache", k_cache, (num_blocks, block_size, num_kv_heads, head_dim))
    check_shape("v_cache", v_cache, k_cache.shape)
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    check_rows_contiguous("key", key)
    check_rows_contiguous("value", value)
    check_contiguous("k_cache", k_cache)
    check_contiguous("v_cache", v_cache)
    check_contiguous("slot_mapping", slot_mapping)
    check_device(_store_kv_kernel, key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    if num_tokens == 0:
        return

    mantissa_bits, min_normal_exp = (2, -14) if k_cache.dtype == torch.float8_e5m2 else (3, -6)
    block_d = head_dim_tile(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, _TILE_ELEMENTS // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _store_kv_kernel[grid](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        block_size,
        k_scale,
        v_scale,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        QUANTIZE=quantize,
        FP8_MAX=fp8_max(k_cache.dtype) if quantize else 0.0,
        MANTISSA_BITS=mantissa_bits,
        MIN_NORMAL=2.0**min_normal_exp,
        SUBNORMAL_MAGIC=2.0 ** (min_normal_exp - mantissa_bits + 23),
    )
