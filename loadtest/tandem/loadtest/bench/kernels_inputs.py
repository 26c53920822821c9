"""What the kernel benchmarks feed the kernels and their torch baselines, and how they judge them.

- `AttentionShape`: one attention layer (Llama-3-8B's by default) and the KV dtype.
- `random_paged_kv`: a batch of equal-length sequences whose K/V lie in shuffled cache blocks,
  as a decode worker's pool holds them after a while; `gather_kv` reads them back into the
  contiguous `[batch, num_kv_heads, context_len, head_dim]` tensors that SDPA takes.
- `Timer`: how a case is timed, injected so that the arithmetic is tested on CPU with a fixed
  time; on a GPU it is `triton.testing.do_bench`.
- `compare`: the correctness check of a kernel's output against SDPA's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

# A timer runs `fn` (at least once) and returns milliseconds per call.
Timer = Callable[[Callable[[], object]], float]

# bf16 tolerance of the kernel tests (tests/kernels/conftest.py): |got - sdpa| <= ATOL + RTOL * |sdpa|
ATOL = 3e-2
RTOL = 2e-2


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer: query and KV heads (GQA), head dim, cache block size, dtype."""

    name: str = "Llama-3-8B"
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def kv_bytes_per_token(self) -> int:
        """K plus V of one token of one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def describe(self) -> str:
        return (
            f"{self.name} layer: {self.num_heads} query / {self.num_kv_heads} KV heads, head dim "
            f"{self.head_dim}, block size {self.block_size}, {str(self.dtype).removeprefix('torch.')}"
        )


class PagedKV(NamedTuple):
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # int32 [batch, blocks_per_seq], a permutation of all blocks
    seq_lens: torch.Tensor  # int32 [batch], all context_len


def random_paged_kv(
    shape: AttentionShape, batch: int, context_len: int, device: torch.device, generator: torch.Generator
) -> PagedKV:
    """Standard-normal K/V for `batch` sequences of `context_len` tokens in shuffled blocks."""
    blocks_per_seq = -(-context_len // shape.block_size)
    num_blocks = batch * blocks_per_seq
    cache_shape = (num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device, generator=generator)
    v_cache = torch.randn(cache_shape, dtype=shape.dtype, device=device, generator=generator)
    order = torch.randperm(num_blocks, device=device, generator=generator)
    block_tables = order.to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context_len, dtype=torch.int32, device=device)
    return PagedKV(k_cache, v_cache, block_tables, seq_lens)


def gather_kv(paged: PagedKV, num_seqs: int, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_seqs` sequences' K and V, each `[num_seqs, num_kv_heads, context_len, head_dim]`
    and contiguous (the layout SDPA reads fastest)."""
    tables = paged.block_tables[:num_seqs].long()  # [num_seqs, blocks_per_seq]

    def gather(cache: torch.Tensor) -> torch.Tensor:
        blocks = cache[tables]  # [num_seqs, blocks_per_seq, block_size, kvh, d]
        tokens = blocks.flatten(1, 2)[:, :context_len]  # [num_seqs, context_len, kvh, d]
        return tokens.transpose(1, 2).contiguous()

    return gather(paged.k_cache), gather(paged.v_cache)


class Comparison(NamedTuple):
    max_abs_diff: float
    ok: bool  # every element within ATOL + RTOL * |expected|


def compare(got: torch.Tensor, expected: torch.Tensor) -> Comparison:
    """Elementwise check of a kernel's output against the baseline's (same shape), in float32."""
    if got.shape != expected.shape:
        raise ValueError(f"output shape {tuple(got.shape)} differs from the baseline's {tuple(expected.shape)}")
    diff = (got.float() - expected.float()).abs()
    ok = bool((diff <= ATOL + RTOL * expected.float().abs()).all())
    return Comparison(float(diff.max()) if diff.numel() else 0.0, ok)


def check_cell(comparison: Comparison) -> str:
    return "ok" if comparison.ok else "FAILED"
