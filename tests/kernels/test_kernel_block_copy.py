"""pack_blocks / unpack_blocks against the torch reference: exact copies, exact layout."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import pack_blocks, unpack_blocks
from tandem.kernels.reference import ref_pack_blocks, ref_unpack_blocks


def _caches(
    num_layers: int, dtype: torch.dtype, rand, seed: int = 0, shape: tuple[int, int, int, int] = (7, 16, 2, 80)
) -> tuple[list, list]:
    k = [rand(shape, dtype, seed=seed + 2 * i) for i in range(num_layers)]
    v = [rand(shape, dtype, seed=seed + 2 * i + 1) for i in range(num_layers)]
    return k, v


@pytest.mark.parametrize(
    ("num_layers", "dtype", "ids_kind"),
    [(1, torch.float32, "list"), (3, torch.float16, "int32"), (2, torch.bfloat16, "int64")],
)
def test_pack_matches_reference_layout(num_layers: int, dtype: torch.dtype, ids_kind: str, rand, device) -> None:
    k_caches, v_caches = _caches(num_layers, dtype, rand)
    ids_list = [5, 0, 3]
    ids = ids_list if ids_kind == "list" else torch.tensor(ids_list, dtype=getattr(torch, ids_kind), device=device)

    buffer = pack_blocks(k_caches, v_caches, ids)

    assert buffer.dtype == dtype and buffer.dim() == 1
    assert torch.equal(buffer, ref_pack_blocks(k_caches, v_caches, ids_list))
    # The documented layout: [num_layers, 2, num_ids, block_size, num_kv_heads, head_dim]
    view = buffer.view(num_layers, 2, 3, 16, 2, 80)
    assert torch.equal(view[num_layers - 1, 1, 0], v_caches[-1][5])
    assert torch.equal(view[0, 0, 2], k_caches[0][3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpack_into_other_blocks(dtype: torch.dtype, rand, device) -> None:
    """Round trip between two pools: destination ids differ, other blocks stay untouched."""
    src_k, src_v = _caches(2, dtype, rand)
    dst_k, dst_v = _caches(2, dtype, rand, seed=10, shape=(9, 16, 2, 80))
    expected_k = [t.clone() for t in dst_k]
    expected_v = [t.clone() for t in dst_v]
    src_ids, dst_ids = [1, 6, 2], [8, 0, 4]
    buffer = pack_blocks(src_k, src_v, src_ids)

    unpack_blocks(buffer, dst_k, dst_v, torch.tensor(dst_ids, dtype=torch.int32, device=device))

    ref_unpack_blocks(buffer, expected_k, expected_v, dst_ids)
    for got, expected in zip(dst_k + dst_v, expected_k + expected_v):
        assert torch.equal(got, expected)
    for layer in range(2):
        for s, d in zip(src_ids, dst_ids):
            assert torch.equal(dst_k[layer][d], src_k[layer][s])
            assert torch.equal(dst_v[layer][d], src_v[layer][s])


def test_pack_no_blocks(rand) -> None:
    k_caches, v_caches = _caches(2, torch.float16, rand)
    buffer = pack_blocks(k_caches, v_caches, [])
    assert buffer.numel() == 0
    unpack_blocks(buffer, k_caches, v_caches, [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pack_unpack_large_gpu(rand, device) -> None:
    shape = (2048, 16, 8, 128)
    k_caches = [rand(shape, torch.float16, seed=i) for i in range(4)]
    v_caches = [rand(shape, torch.float16, seed=10 + i) for i in range(4)]
    ids = torch.randperm(2048, device=device)[:300]
    buffer = pack_blocks(k_caches, v_caches, ids)
    assert torch.equal(buffer, ref_pack_blocks(k_caches, v_caches, ids))
    dst_k = [torch.zeros_like(t) for t in k_caches]
    dst_v = [torch.zeros_like(t) for t in v_caches]
    unpack_blocks(buffer, dst_k, dst_v, ids)
    for got, src in zip(dst_k + dst_v, k_caches + v_caches):
        assert torch.equal(got[ids], src[ids])
