"""Prefill attention TFLOP/s of the paged Triton kernel beside torch SDPA (causal, GQA).

Prefill is compute-bound: each of a prompt's S tokens attends to itself and every earlier
token, S (S + 1) / 2 (query, key) pairs per sequence, each costing a dot product for Q K^T and
a multiply-add row for P V. The cases are fresh prompts (query length = sequence length) with
the same total token count, so the longer ones show how the kernel scales with S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.kernels.prefill_attention import paged_prefill_attention
from tandem.loadtest.bench.kernels_inputs import (
    ATOL,
    RTOL,
    AttentionShape,
    Comparison,
    Timer,
    check_cell,
    compare,
    gather_kv,
    random_paged_kv,
)
from tandem.loadtest.gpu.report import Table

PREFILL_TOKENS = 16384  # batch * seq_len of every case


@dataclass(frozen=True)
class PrefillCase:
    seq_len: int
    batch: int

    @property
    def causal_pairs(self) -> int:
        return self.batch * self.seq_len * (self.seq_len + 1) // 2


@dataclass(frozen=True)
class PrefillResult:
    case: PrefillCase
    flops: int
    triton_ms: float
    sdpa_ms: float
    comparison: Comparison

    @property
    def triton_tflops(self) -> float:
        return tflops(self.flops, self.triton_ms)

    @property
    def sdpa_tflops(self) -> float:
        return tflops(self.flops, self.sdpa_ms)


def tflops(flops: int, ms: float) -> float:
    """Tera (1e12) floating-point operations per second."""
    return flops / (ms * 1e-3) / 1e12


def attention_flops(shape: AttentionShape, case: PrefillCase) -> int:
    """4 * heads * head_dim per causal pair: Q K^T and P V, 2 FLOPs per multiply-add each."""
    return 4 * shape.num_heads * shape.head_dim * case.causal_pairs


def prefill_cases() -> list[PrefillCase]:
    return [PrefillCase(seq_len, PREFILL_TOKENS // seq_len) for seq_len in (1024, 4096, 8192)]


def measure_prefill(
    shape: AttentionShape, case: PrefillCase, device: torch.device, timer: Timer, seed: int = 0
) -> PrefillResult:
    """Time the Triton kernel and SDPA on one batch of fresh prompts; check one against the other."""
    generator = torch.Generator(device=device).manual_seed(seed)
    paged = random_paged_kv(shape, case.batch, case.seq_len, device, generator)
    num_tokens = case.batch * case.seq_len
    query = torch.randn(
        (num_tokens, shape.num_heads, shape.head_dim), dtype=shape.dtype, device=device, generator=generator
    )  # [batch * seq_len, num_heads, head_dim]
    query_start_loc = torch.arange(0, num_tokens + 1, case.seq_len, dtype=torch.int32, device=device)
    scale = shape.head_dim**-0.5

    def triton() -> torch.Tensor:
        return paged_prefill_attention(
            query, paged.k_cache, paged.v_cache, paged.block_tables, query_start_loc, paged.seq_lens, scale
        )

    triton_ms = timer(triton)
    got = triton()  # [batch * seq_len, num_heads, head_dim]

    keys, values = gather_kv(paged, case.batch, case.seq_len)  # [batch, num_kv_heads, seq_len, head_dim]
    q4 = query.view(case.batch, case.seq_len, shape.num_heads, shape.head_dim).transpose(1, 2).contiguous()

    def sdpa() -> torch.Tensor:  # [batch, num_heads, seq_len, head_dim]
        return torch.nn.functional.scaled_dot_product_attention(
            q4, keys, values, is_causal=True, scale=scale, enable_gqa=True
        )

    sdpa_ms = timer(sdpa)
    expected = sdpa().transpose(1, 2).reshape(num_tokens, shape.num_heads, shape.head_dim)
    return PrefillResult(case, attention_flops(shape, case), triton_ms, sdpa_ms, compare(got, expected))


def prefill_row(result: PrefillResult) -> tuple[str, ...]:
    case = result.case
    return (
        str(case.seq_len),
        str(case.batch),
        f"{result.triton_ms:.3f}",
        f"{result.triton_tflops:.1f}",
        f"{result.sdpa_ms:.3f}",
        f"{result.sdpa_tflops:.1f}",
        f"{result.sdpa_ms / result.triton_ms:.2f}x",
        f"{result.comparison.max_abs_diff:.2e}",
        check_cell(result.comparison),
    )


def prefill_table(shape: AttentionShape, results: list[PrefillResult]) -> Table:
    return Table(
        title=f"prefill attention: {shape.describe()}",
        headers=(
            "seq len",
            "batch",
            "Triton ms",
            "Triton TFLOP/s",
            "SDPA ms",
            "SDPA TFLOP/s",
            "Triton speed vs SDPA",
            "max|diff|",
            "check",
        ),
        rows=tuple(prefill_row(r) for r in results),
        notes=(
            f"FLOPs = 4 * {shape.num_heads} heads * {shape.head_dim} head dim * causal pairs, causal pairs = "
            "batch * S * (S + 1) / 2 (Q K^T and P V, 2 FLOPs per multiply-add; masked pairs not counted); "
            "TFLOP/s = 1e12 FLOP/s",
            "Triton: paged_prefill_attention on fresh prompts (query length = seq len), K/V read from "
            "shuffled cache blocks; SDPA: is_causal, enable_gqa, on contiguous [batch, heads, S, head dim] "
            "tensors (its gather is not timed)",
            f"check: Triton vs SDPA elementwise, |diff| <= {ATOL} + {RTOL} * |SDPA| (the kernel tests' bf16 "
            "tolerance); max|diff| over every output element",
        ),
    )
