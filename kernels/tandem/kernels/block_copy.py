"""Block pack/unpack: move whole KV blocks of every layer to and from one flat buffer.

Used by the KV hand-off: the prefill worker packs a prompt's blocks into one contiguous
buffer (one device-to-host copy, or one NCCL send), the decode worker unpacks it into the
blocks it allocated.

Buffer layout (the wire contract of a packed transfer, see DESIGN.md section 4):

    [num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim]   flattened, 1-D

K at index 0 and V at index 1 of the second axis, blocks in the order of `block_ids`, in the
caches' dtype. Every (layer, K/V, block) chunk is one contiguous run of
`block_size * num_kv_heads * head_dim` elements, both in the buffer and in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from tandem.kernels.launch_checks import (
    KV_CACHE_DTYPES,
    check_contiguous,
    check_device,
    check_shape,
    check_tensor,
)

_BLOCK = 1024  # elements copied per program


@triton.jit
def _block_copy_kernel(
    cache_ptrs_ptr,  # int64 [num_layers * 2]: data pointers of K0, V0, K1, V1, ...
    buffer_ptr,  # 1-D [num_layers * 2 * num_ids * block_numel]
    block_ids_ptr,  # int64 [num_ids]
    num_ids,
    block_numel,  # elements of one cache block: block_size * num_kv_heads * head_dim
    PACK: tl.constexpr,  # True: cache -> buffer; False: buffer -> cache
    BLOCK: tl.constexpr,
):
    """Copy BLOCK elements of one (block, layer-and-K/V) chunk between a cache and the buffer.

    Grid: (num_ids, num_layers * 2, cdiv(block_numel, BLOCK)). One launch covers every layer:
    the layer's cache base address is read from a pointer table (as vLLM's `copy_blocks`
    does), so the per-layer tensors need not live in one allocation.
    """
    i = tl.program_id(0)
    cache_index = tl.program_id(1)  # layer * 2 + (0 for K, 1 for V)
    chunk = tl.program_id(2)
    block = tl.load(block_ids_ptr + i)  # int64
    cache_ptr = tl.load(cache_ptrs_ptr + cache_index).to(tl.pointer_type(buffer_ptr.dtype.element_ty))
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < block_numel
    cache_offsets = block * block_numel + offsets
    buffer_offsets = (cache_index.to(tl.int64) * num_ids + i) * block_numel + offsets
    if PACK:
        tl.store(buffer_ptr + buffer_offsets, tl.load(cache_ptr + cache_offsets, mask=mask), mask=mask)
    else:
        tl.store(cache_ptr + cache_offsets, tl.load(buffer_ptr + buffer_offsets, mask=mask), mask=mask)


def _check_caches(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]) -> None:
    """All layers' K and V caches: same shape, dtype and device; contiguous."""
    if len(k_caches) == 0 or len(k_caches) != len(v_caches):
        raise ValueError(
            f"k_caches and v_caches must be non-empty lists of equal length, got {len(k_caches)} and {len(v_caches)}"
        )
    first = check_tensor("k_caches[0]", k_caches[0], 4, KV_CACHE_DTYPES)
    for kind, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        for layer, cache in enumerate(caches):
            name = f"{kind}[{layer}]"
            check_tensor(name, cache, 4, (first.dtype,))
            check_shape(name, cache, first.shape)
            check_contiguous(name, cache)
            check_device(_block_copy_kernel, **{"k_caches[0]": first, name: cache})


def _block_ids_tensor(block_ids: torch.Tensor | Sequence[int], num_blocks: int, device: torch.device) -> torch.Tensor:
    """Validate block ids against [0, num_blocks) and return them as int64 on `device`.

    Block ids may come from a peer, so the range check is worth its device sync.
    """
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"block_ids must be a 1-D int32/int64 tensor, got {block_ids.dtype} of shape {tuple(block_ids.shape)}"
            )
        ids = block_ids.to(device=device, dtype=torch.int64).contiguous()
    else:
        ids = torch.tensor(list(block_ids), dtype=torch.int64, device=device)
    if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block_ids must lie in [0, {num_blocks}), got min {int(ids.min())} max {int(ids.max())}")
    return ids


def _launch(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    buffer: torch.Tensor,
    ids: torch.Tensor,
    pack: bool,
) -> None:
    num_layers = len(k_caches)
    block_numel = k_caches[0][0].numel()
    pointers = [t.data_ptr() for pair in zip(k_caches, v_caches) for t in pair]
    cache_ptrs = torch.tensor(pointers, dtype=torch.int64, device=buffer.device)
    grid = (ids.numel(), num_layers * 2, triton.cdiv(block_numel, _BLOCK))
    _block_copy_kernel[grid](cache_ptrs, buffer, ids, ids.numel(), block_numel, PACK=pack, BLOCK=_BLOCK)


def pack_blocks(
    k_caches: Sequence[torch.Tensor],  # num_layers x [num_blocks, block_size, num_kv_heads, head_dim]
    v_caches: Sequence[torch.Tensor],  # num_layers x [num_blocks, block_size, num_kv_heads, head_dim]
    block_ids: torch.Tensor | Sequence[int],  # [num_ids]
) -> torch.Tensor:  # 1-D [num_layers * 2 * num_ids * block_size * num_kv_heads * head_dim]
    """Gather `block_ids` of every layer's K and V cache into a new flat buffer.

    Layout: module docstring. The caches are only read.
    """
    _check_caches(k_caches, v_caches)
    first = k_caches[0]
    ids = _block_ids_tensor(block_ids, first.shape[0], first.device)
    buffer = torch.empty(len(k_caches) * 2 * ids.numel() * first[0].numel(), dtype=first.dtype, device=first.device)
    if buffer.numel() > 0:
        _launch(k_caches, v_caches, buffer, ids, pack=True)
    return buffer


def unpack_blocks(
    buffer: torch.Tensor,  # 1-D, layout of pack_blocks
    k_caches: Sequence[torch.Tensor],  # num_layers x [num_blocks, block_size, num_kv_heads, head_dim]
    v_caches: Sequence[torch.Tensor],
    block_ids: torch.Tensor | Sequence[int],  # [num_ids] destination blocks
) -> None:
    """Scatter a packed buffer into `block_ids` of every layer's caches, in place.

    The destination ids need not equal the ids the buffer was packed from; they should be
    distinct (a repeated id receives one of its chunks, unspecified which).
    """
    _check_caches(k_caches, v_caches)
    first = k_caches[0]
    check_tensor("buffer", buffer, 1, (first.dtype,))
    check_contiguous("buffer", buffer)
    check_device(_block_copy_kernel, buffer=buffer, k_caches=first)
    ids = _block_ids_tensor(block_ids, first.shape[0], first.device)
    expected = len(k_caches) * 2 * ids.numel() * first[0].numel()
    if buffer.numel() != expected:
        raise ValueError(
            f"buffer has {buffer.numel()} elements, expected {expected} for "
            f"{len(k_caches)} layers x 2 x {ids.numel()} blocks of "
            f"{tuple(first.shape[1:])}"
        )
    if expected > 0:
        _launch(k_caches, v_caches, buffer, ids, pack=False)
