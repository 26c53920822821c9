"""The Triton attention backend against the torch backend, one engine step at a time, in
float32, float16 and bfloat16.

`check_backends_agree` runs both backends' `forward` on the same random step (the engine's
`[2, num_blocks, block_size, num_kv_heads, head_dim]` cache, shuffled block tables, spare blocks)
and asserts:
1. both store the step's K/V into exactly the same slots, bit for bit;
2. Triton's output is within the kernel tolerance (`conftest.TOLERANCES`) of the float32
   result: the torch backend run on the same inputs upcast to float32, rounded to the dtype;
3. Triton's output is within twice that tolerance of the torch backend's output in the same
   dtype (each backend is within the tolerance of the float32 result, so the two are within
   twice of each other).

A mixed step (fresh prompts, chunks over cached prefixes, decode rows) goes through the prefill
kernel; a decode-only step through the split-context decode kernel. On CPU the check runs in the
interpreter with tiny shapes; the gpu-marked tests run it compiled with Llama-3-8B attention
shapes (32 heads, 8 KV heads, head dim 128, block size 16) and contexts up to 8k tokens.
"""

from __future__ import annotations

import pytest
import torch

from tandem.engine.attention import AttentionMetadata
from tandem.engine.attention_torch import TorchAttentionBackend
from tandem.engine.attention_triton import TritonAttentionBackend
from tests.kernels.conftest import ON_CUDA, TOLERANCES, assert_close, make_paged_kv, random_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def pair_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Triton against torch in the same dtype: twice the kernel tolerance against float32."""
    return {name: 2 * value for name, value in TOLERANCES[dtype].items()}


def step_metadata(
    seq_lens: list[int], query_lens: list[int], block_tables: torch.Tensor, block_size: int
) -> AttentionMetadata:
    """The metadata of a step whose sequence i adds its last `query_lens[i]` tokens, laid out as
    the model runner lays it out (slots from the block table, tables padded with block 0)."""
    tables = block_tables.cpu().long()
    slots: list[int] = []
    for i, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        for pos in range(seq_len - query_len, seq_len):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    loc = [0]
    for n in query_lens:
        loc.append(loc[-1] + n)
    device = block_tables.device
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables,
        query_lens=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
        block_size=block_size,
    )


def check_backends_agree(
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> None:
    """Run both backends on one random step and assert points 1-3 of the module docstring."""
    kv = make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed=5)
    kv_cache = torch.stack([kv.k_cache, kv.v_cache])  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    # one fused projection, sliced as the model slices it (rows are strided views)
    qkv = random_tensor((sum(query_lens), num_heads + 2 * num_kv_heads, head_dim), dtype, seed=6)
    query = qkv[:, :num_heads]
    key = qkv[:, num_heads : num_heads + num_kv_heads]
    value = qkv[:, num_heads + num_kv_heads :]
    meta = step_metadata(seq_lens, query_lens, kv.block_tables, block_size)
    scale = head_dim**-0.5
    triton_cache, torch_cache, exact_cache = kv_cache.clone(), kv_cache.clone(), kv_cache.float().clone()

    got = TritonAttentionBackend().forward(query, key, value, triton_cache, meta, scale)
    same_dtype = TorchAttentionBackend().forward(query, key, value, torch_cache, meta, scale)
    exact = TorchAttentionBackend().forward(query.float(), key.float(), value.float(), exact_cache, meta, scale)

    assert torch.equal(triton_cache, torch_cache)
    assert not torch.equal(triton_cache, kv_cache)  # the step did write its K/V
    assert_close(got, exact.to(dtype))
    assert got.dtype == same_dtype.dtype == dtype
    torch.testing.assert_close(got.float(), same_dtype.float(), **pair_tolerance(dtype))


# Tiny steps for the interpreter: (seq_len, query_len) = one-token prompt, decode row, fresh
# prompt over three blocks, chunk after a cached prefix that ends mid-block.
TINY_MIXED = ([1, 9, 40, 29], [1, 1, 40, 11])
TINY_DECODE = ([1, 16, 17, 40], [1, 1, 1, 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lens", [TINY_MIXED, TINY_DECODE], ids=["mixed-step", "decode-step"])
def test_backends_agree_tiny(lens: tuple[list[int], list[int]], dtype: torch.dtype) -> None:
    seq_lens, query_lens = lens
    check_backends_agree(seq_lens, query_lens, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=dtype)


# A mixed step: one-token prompt, decode rows at 17 and 4096, a fresh 300-token prompt, a
# 100-token chunk after a cached 2048-token prefix, a 13-token chunk ending mid-block, a fresh
# 77-token prompt.
LARGE_MIXED = ([1, 17, 300, 2148, 4096, 1000, 77], [1, 1, 300, 100, 1, 13, 77])
# A decode step of 24 sequences around block and split edges, up to 8192 tokens.
LARGE_DECODE_LENS = [1, 15, 16, 17, 31, 64, 100, 257, 511, 1024, 1500, 2047]
LARGE_DECODE_LENS += [2048, 2049, 3000, 4095, 4096, 4097, 5000, 6000, 7000, 8000, 8191, 8192]
LARGE_DECODE = (LARGE_DECODE_LENS, [1] * len(LARGE_DECODE_LENS))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lens", [LARGE_MIXED, LARGE_DECODE], ids=["mixed-step", "decode-step"])
def test_backends_agree_llama3_8b_shapes_gpu(lens: tuple[list[int], list[int]], dtype: torch.dtype) -> None:
    seq_lens, query_lens = lens
    check_backends_agree(seq_lens, query_lens, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype)
