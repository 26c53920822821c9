"""Paged decode attention bandwidth, against a device-to-device copy on the same GPU.

Decode reads every context token's K and V once per step and does little arithmetic on them, so
its figure of merit is achieved bandwidth: K+V bytes read per second. The ceiling is what the
device reaches on a plain large copy (`Tensor.copy_`, read + write bytes counted), measured in
the same run. For reference, torch SDPA runs on the same K/V pre-gathered into contiguous
tensors (the gather is not timed, which favours SDPA); it is also the correctness baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.kernels.decode_attention import paged_decode_attention
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

DECODE_CONTEXTS = (1024, 4096, 8192, 16384, 32768)
DECODE_BATCHES = (1, 8, 64)
COPY_BYTES = 1 << 30  # source buffer; 2 GiB move per copy
SDPA_MAX_KV_BYTES = 4 << 30  # above this, SDPA is not timed (its gathered copy would double the KV)
CHECK_SEQS = 8  # where SDPA is not timed, the check covers this many sequences
GOAL_MIN_CONTEXT = 4096
GOAL_FRACTION = 0.75  # issue 14: decode at >= 4k context reaches >= 75% of the copy bandwidth


@dataclass(frozen=True)
class CopyResult:
    size_bytes: int  # bytes of the source buffer
    ms: float

    @property
    def moved_bytes(self) -> int:
        return 2 * self.size_bytes  # read + write

    @property
    def gbps(self) -> float:
        return gbps(self.moved_bytes, self.ms)


@dataclass(frozen=True)
class DecodeCase:
    context_len: int
    batch: int


@dataclass(frozen=True)
class DecodeResult:
    case: DecodeCase
    kv_bytes: int  # K + V of every context token of every sequence
    triton_ms: float
    sdpa_ms: float | None  # None: not timed (SDPA_MAX_KV_BYTES)
    checked_seqs: int  # sequences compared with SDPA
    comparison: Comparison

    @property
    def triton_gbps(self) -> float:
        return gbps(self.kv_bytes, self.triton_ms)


def gbps(num_bytes: int, ms: float) -> float:
    """Gigabytes (1e9) per second."""
    return num_bytes / (ms * 1e-3) / 1e9


def size_text(num_bytes: int) -> str:
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if num_bytes >= unit:
            return f"{num_bytes / unit:.1f} {name}"
    return f"{num_bytes} B"


def decode_cases() -> list[DecodeCase]:
    return [DecodeCase(context, batch) for context in DECODE_CONTEXTS for batch in DECODE_BATCHES]


def measure_copy(device: torch.device, timer: Timer, size_bytes: int = COPY_BYTES) -> CopyResult:
    """Time `dst.copy_(src)` of a `size_bytes` buffer on `device`."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return CopyResult(size_bytes, timer(lambda: dst.copy_(src)))


def measure_decode(
    shape: AttentionShape,
    case: DecodeCase,
    device: torch.device,
    timer: Timer,
    sdpa_max_kv_bytes: int = SDPA_MAX_KV_BYTES,
    seed: int = 0,
) -> DecodeResult:
    """Time the Triton kernel (and SDPA where the gathered K/V fits) on one batch; check it."""
    generator = torch.Generator(device=device).manual_seed(seed)
    paged = random_paged_kv(shape, case.batch, case.context_len, device, generator)
    query = torch.randn(
        (case.batch, shape.num_heads, shape.head_dim), dtype=shape.dtype, device=device, generator=generator
    )  # [batch, num_heads, head_dim]
    scale = shape.head_dim**-0.5

    def triton() -> torch.Tensor:
        return paged_decode_attention(query, paged.k_cache, paged.v_cache, paged.block_tables, paged.seq_lens, scale)

    triton_ms = timer(triton)
    got = triton()  # [batch, num_heads, head_dim]

    kv_bytes = case.batch * case.context_len * shape.kv_bytes_per_token
    time_sdpa = kv_bytes <= sdpa_max_kv_bytes
    checked = case.batch if time_sdpa else min(case.batch, CHECK_SEQS)
    keys, values = gather_kv(paged, checked, case.context_len)  # [checked, num_kv_heads, context_len, head_dim]
    q4 = query[:checked].unsqueeze(2)  # [checked, num_heads, 1, head_dim]

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q4, keys, values, scale=scale, enable_gqa=True)

    sdpa_ms = timer(sdpa) if time_sdpa else None
    comparison = compare(got[:checked], sdpa().squeeze(2))
    return DecodeResult(case, kv_bytes, triton_ms, sdpa_ms, checked, comparison)


def goal_cell(result: DecodeResult, copy: CopyResult) -> str:
    if result.case.context_len < GOAL_MIN_CONTEXT:
        return "-"
    return "met" if result.triton_gbps >= GOAL_FRACTION * copy.gbps else "missed"


def copy_table(copy: CopyResult, timing: str) -> Table:
    return Table(
        title="device-to-device copy (the bandwidth reference)",
        headers=("buffer", "moved (read + write)", "ms", "GB/s"),
        rows=((size_text(copy.size_bytes), size_text(copy.moved_bytes), f"{copy.ms:.3f}", f"{copy.gbps:.1f}"),),
        notes=(f"`dst.copy_(src)` of a uint8 buffer; {timing}",),
    )


def decode_row(result: DecodeResult, copy: CopyResult) -> tuple[str, ...]:
    case = result.case
    if result.sdpa_ms is None:
        sdpa_cells = ("not timed", "not timed")
    else:
        sdpa_cells = (f"{1e3 * result.sdpa_ms:.1f}", f"{gbps(result.kv_bytes, result.sdpa_ms):.1f}")
    diff = f"{result.comparison.max_abs_diff:.2e}"
    if result.checked_seqs < case.batch:
        diff += f" ({result.checked_seqs} of {case.batch} seqs)"
    return (
        str(case.context_len),
        str(case.batch),
        size_text(result.kv_bytes),
        f"{1e3 * result.triton_ms:.1f}",
        f"{result.triton_gbps:.1f}",
        f"{100 * result.triton_gbps / copy.gbps:.1f}%",
        goal_cell(result, copy),
        *sdpa_cells,
        diff,
        check_cell(result.comparison),
    )


def decode_table(
    shape: AttentionShape,
    results: list[DecodeResult],
    copy: CopyResult,
    sdpa_max_kv_bytes: int = SDPA_MAX_KV_BYTES,
) -> Table:
    skipped = [f"{r.case.batch} x {r.case.context_len}" for r in results if r.sdpa_ms is None]
    notes = [
        f"K+V read = batch * context * {shape.kv_bytes_per_token} bytes (K and V of every context token, "
        "read once); GB/s = 1e9 bytes/s; % of copy = Triton GB/s / copy GB/s (read + write counted)",
        f"goal (issue 14): at context >= {GOAL_MIN_CONTEXT}, >= {GOAL_FRACTION:.0%} of the copy bandwidth "
        "(reported, not enforced)",
        "SDPA: torch scaled_dot_product_attention (enable_gqa) on K/V pre-gathered into contiguous "
        "[batch, KV heads, context, head dim] tensors; the gather is not timed, which favours SDPA",
        f"check: Triton vs SDPA elementwise, |diff| <= {ATOL} + {RTOL} * |SDPA| (the kernel tests' bf16 "
        "tolerance); max|diff| over every output element compared",
    ]
    if skipped:
        notes.append(
            f"SDPA not timed where the gathered K/V would exceed {size_text(sdpa_max_kv_bytes)} "
            f"(batch x context: {', '.join(skipped)}); there the check covers the first {CHECK_SEQS} sequences"
        )
    return Table(
        title=f"paged decode attention: {shape.describe()}",
        headers=(
            "context",
            "batch",
            "K+V read",
            "Triton µs",
            "Triton GB/s",
            "% of copy",
            f"goal >= {GOAL_FRACTION:.0%} (ctx >= {GOAL_MIN_CONTEXT // 1024}k)",
            "SDPA µs",
            "SDPA GB/s",
            "max|diff|",
            "check",
        ),
        rows=tuple(decode_row(r, copy) for r in results),
        notes=tuple(notes),
    )
