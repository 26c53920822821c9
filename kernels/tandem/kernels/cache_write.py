"""Cache write: scatter a step's new K/V rows into their slots of the paged KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.launch_checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_contiguous,
    check_device,
    check_rows_contiguous,
    check_same_dtype,
    check_shape,
    check_tensor,
    head_dim_tile,
)

# Elements of one program's [BLOCK_H, BLOCK_D] tile: 2048 keeps register use moderate.
_TILE_ELEMENTS = 2048


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
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # kv heads per program (power of two)
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
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
) -> None:
    """Write `key`/`value` into the paged caches at `slot_mapping`, in place.

    `slot = block_id * block_size + offset`; a negative slot skips its token. The caches must be
    contiguous and share the dtype of `key`/`value`; `key`/`value` need only a unit stride on
    head_dim (views of a fused QKV projection are fine). Slots are not range-checked (that would
    cost a device sync per layer); the engine's block pool owns their validity.
    """
    check_tensor("key", key, 3, FLOAT_DTYPES)
    check_tensor("value", value, 3, FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES)
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES)
    check_same_dtype(key.dtype, value=value, k_cache=k_cache, v_cache=v_cache)
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
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
    )
