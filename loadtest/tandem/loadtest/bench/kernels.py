"""Decode attention benchmark behind `tandem bench kernels`.

Decode is memory-bound, so the figure of merit is achieved bandwidth: bytes of K/V read per
second, compared with what the device reaches on a plain large copy (`Tensor.copy_`, read +
write counted). For reference it also times `scaled_dot_product_attention` on the same KV
already gathered into contiguous tensors (the gather itself is not timed, which favours SDPA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.kernels.reference import gather_context

_COPY_BYTES = 512 * 2**20
_TOKENS_PER_CASE = 65536  # batch * context, so every case reads the same KV volume
_CONTEXT_LENS = (1024, 4096, 16384)


@dataclass(frozen=True)
class DecodeShape:
    """A Llama-3-8B-like attention layer."""

    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.float16


def _time_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn))


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    src = torch.empty(_COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * _COPY_BYTES / (ms * 1e-3)


def _decode_case(
    context_len: int, shape: DecodeShape, device: torch.device, out: Callable[[str], object], copy_bw: float
) -> None:
    from tandem.kernels.decode_attention import paged_decode_attention

    num_seqs = max(1, _TOKENS_PER_CASE // context_len)
    blocks_per_seq = math.ceil(context_len / shape.block_size)
    num_blocks = num_seqs * blocks_per_seq
    gen = torch.Generator(device=device).manual_seed(0)
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device, generator=gen)
    v_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device, generator=gen)
    block_tables = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    block_tables = block_tables.view(num_seqs, blocks_per_seq)
    seq_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=device)
    query = torch.randn((num_seqs, shape.num_heads, shape.head_dim), dtype=shape.dtype, device=device, generator=gen)
    scale = shape.head_dim**-0.5

    kv_bytes = 2 * num_seqs * context_len * shape.num_kv_heads * shape.head_dim * k_cache.element_size()
    triton_ms = _time_ms(lambda: paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale))

    # SDPA baseline on pre-gathered KV: [num_seqs, num_kv_heads, context_len, head_dim]
    keys = (
        torch.stack([gather_context(k_cache, block_tables[i], context_len) for i in range(num_seqs)])
        .transpose(1, 2)
        .contiguous()
    )
    values = (
        torch.stack([gather_context(v_cache, block_tables[i], context_len) for i in range(num_seqs)])
        .transpose(1, 2)
        .contiguous()
    )
    q4 = query.unsqueeze(2)  # [num_seqs, num_heads, 1, head_dim]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa_ms = _time_ms(lambda: sdpa(q4, keys, values, scale=scale, enable_gqa=True))

    expected = sdpa(q4, keys, values, scale=scale, enable_gqa=True).squeeze(2)
    got = paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale)
    max_err = (got.float() - expected.float()).abs().max().item()
    triton_bw = kv_bytes / (triton_ms * 1e-3)
    sdpa_bw = kv_bytes / (sdpa_ms * 1e-3)
    out(
        f"decode ctx={context_len:>6} seqs={num_seqs:>3}  triton {triton_ms:8.3f} ms "
        f"{triton_bw / 1e9:7.1f} GB/s ({100 * triton_bw / copy_bw:5.1f}% of copy)  "
        f"sdpa {sdpa_ms:8.3f} ms {sdpa_bw / 1e9:7.1f} GB/s  max|diff| {max_err:.2e}"
    )


def run_kernel_bench(out: Callable[[str], object] = print) -> int:
    """Run the decode bandwidth benchmark on the current CUDA device; return an exit code."""
    if not torch.cuda.is_available():
        out(
            "kernel benchmark: no CUDA device present; nothing to measure "
            "(the kernels are tested on CPU with TRITON_INTERPRET=1)"
        )
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    shape = DecodeShape()
    copy_bw = measure_copy_bandwidth(device)
    out(f"device {torch.cuda.get_device_name(device)}: copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    out(
        f"shape: heads {shape.num_heads}/{shape.num_kv_heads} kv, head_dim {shape.head_dim}, "
        f"block_size {shape.block_size}, {shape.dtype}; KV bytes = K + V read once"
    )
    for context_len in _CONTEXT_LENS:
        _decode_case(context_len, shape, device, out, copy_bw)
        torch.cuda.empty_cache()
    return 0
