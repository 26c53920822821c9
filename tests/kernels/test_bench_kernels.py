"""`tandem bench kernels`: the real measurement code on tiny shapes with a fixed-time timer.

The kernels run interpreted on CPU (compiled on CUDA); only the clock is fake, so every figure
below follows from the bytes and FLOPs of each case and the timer's fixed milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tandem.loadtest.bench import kernels_decode
from tandem.loadtest.bench.kernels import NO_CUDA, KernelBenchPlan, gpu_check, run_kernel_bench, run_plan
from tandem.loadtest.bench.kernels_decode import CopyResult, DecodeCase, decode_table
from tandem.loadtest.bench.kernels_inputs import AttentionShape, compare
from tandem.loadtest.bench.kernels_prefill import PrefillCase
from tandem.loadtest.gpu.steps import Skip

TINY = AttentionShape("tiny", num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.bfloat16)
# K + V per token: 2 * 2 KV heads * 32 dims * 2 bytes = 256 bytes
DECODE_HEADERS = (
    "context",
    "batch",
    "K+V read",
    "Triton µs",
    "Triton GB/s",
    "% of copy",
    "goal >= 75% (ctx >= 4k)",
    "SDPA µs",
    "SDPA GB/s",
    "max|diff|",
    "check",
)
PREFILL_HEADERS = (
    "seq len",
    "batch",
    "Triton ms",
    "Triton TFLOP/s",
    "SDPA ms",
    "SDPA TFLOP/s",
    "Triton speed vs SDPA",
    "max|diff|",
    "check",
)


class FixedTimer:
    """Runs the function once (so the real kernels run) and reports a fixed time."""

    def __init__(self, ms: float) -> None:
        self.ms = ms
        self.calls = 0

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()
        self.calls += 1
        return self.ms


def test_decode_rows_follow_from_bytes_and_time(device: torch.device) -> None:
    plan = KernelBenchPlan(
        shape=TINY,
        decode=(DecodeCase(40, 1), DecodeCase(64, 2), DecodeCase(16, 10), DecodeCase(4096, 1)),
        prefill=(),
        copy_bytes=1 << 20,
        sdpa_max_kv_bytes=32768,
    )
    timer = FixedTimer(0.001)
    lines: list[str] = []

    report = run_plan(plan, device, timer, "fixed 0.001 ms", progress=lines.append)

    assert report.failures == []
    assert timer.calls == 1 + 4 + 2  # the copy, Triton per case, SDPA where kv <= 32768 bytes
    copy, decode = report.tables
    assert copy.headers == ("buffer", "moved (read + write)", "ms", "GB/s")
    # 2 MiB moved in 1 microsecond: 2097152e6 bytes/s
    assert copy.rows == (("1.0 MiB", "2.0 MiB", "0.001", "2097.2"),)
    assert copy.notes == ("`dst.copy_(src)` of a uint8 buffer; fixed 0.001 ms",)
    assert (
        decode.title == "paged decode attention: tiny layer: 4 query / 2 KV heads, head dim 32, block size 16, bfloat16"
    )
    assert decode.headers == DECODE_HEADERS
    diffs = [row[9] for row in decode.rows]
    for diff in diffs:  # every output is checked; bf16 rounding differences only
        assert float(diff.split()[0]) < 3e-2
    assert [row[:9] + row[10:] for row in decode.rows] == [
        # 40 tokens * 256 = 10240 bytes: 10.24 GB/s, 0.49% of 2097152
        ("40", "1", "10.0 KiB", "1.0", "10.2", "0.5%", "-", "1.0", "10.2", "ok"),
        # 128 tokens * 256 = 32768 bytes (the SDPA limit itself: timed)
        ("64", "2", "32.0 KiB", "1.0", "32.8", "1.6%", "-", "1.0", "32.8", "ok"),
        # 160 tokens * 256 = 40960 bytes: above the limit, checked on 8 of 10 sequences
        ("16", "10", "40.0 KiB", "1.0", "41.0", "2.0%", "-", "not timed", "not timed", "ok"),
        # 4096 tokens * 256 = 1 MiB: half the copy's 2 MiB, short of the 75% goal
        ("4096", "1", "1.0 MiB", "1.0", "1048.6", "50.0%", "missed", "not timed", "not timed", "ok"),
    ]
    assert diffs[2].endswith(" (8 of 10 seqs)") and "(" not in diffs[3]
    assert decode.notes[0].startswith("K+V read = batch * context * 256 bytes")
    assert decode.notes[-1] == (
        "SDPA not timed where the gathered K/V would exceed 32.0 KiB (batch x context: 10 x 16, 1 x 4096); "
        "there the check covers the first 8 sequences"
    )
    assert lines == [
        "copy: 2097.2 GB/s",
        "decode context 40 batch 1: 10.2 GB/s",
        "decode context 64 batch 2: 32.8 GB/s",
        "decode context 16 batch 10: 41.0 GB/s",
        "decode context 4096 batch 1: 1048.6 GB/s",
    ]


def test_decode_goal_is_75_percent_of_copy_at_4k_and_longer(device: torch.device) -> None:
    result = kernels_decode.measure_decode(TINY, DecodeCase(4096, 1), device, FixedTimer(1.0))
    assert (result.kv_bytes, result.checked_seqs, result.sdpa_ms) == (1 << 20, 1, 1.0)
    # 1048576 bytes read vs copies moving 1398100 bytes (75.00007%) and 1398102 bytes (74.99996%)
    above = decode_table(TINY, [result], CopyResult(699050, 1.0))
    below = decode_table(TINY, [result], CopyResult(699051, 1.0))
    assert above.rows[0][:7] == ("4096", "1", "1.0 MiB", "1000.0", "1.0", "75.0%", "met")
    assert below.rows[0][:7] == ("4096", "1", "1.0 MiB", "1000.0", "1.0", "75.0%", "missed")


def test_prefill_rows_follow_from_flops_and_time(device: torch.device) -> None:
    plan = KernelBenchPlan(shape=TINY, decode=(), prefill=(PrefillCase(32, 2), PrefillCase(40, 1)), copy_bytes=1024)
    timer = FixedTimer(1e-6)
    lines: list[str] = []
    report = run_plan(plan, device, timer, "fixed", progress=lines.append)
    assert report.failures == []
    assert timer.calls == 1 + 2 * 2
    prefill = report.tables[2]
    assert prefill.title == "prefill attention: tiny layer: 4 query / 2 KV heads, head dim 32, block size 16, bfloat16"
    assert prefill.headers == PREFILL_HEADERS
    # FLOPs = 4 * 4 heads * 32 dims * pairs; 2 * 32 * 33 / 2 = 1056 pairs, 40 * 41 / 2 = 820 pairs
    # 540672 FLOP and 419840 FLOP in 1e-9 s
    assert [row[:7] + row[8:] for row in prefill.rows] == [
        ("32", "2", "0.000", "540.7", "0.000", "540.7", "1.00x", "ok"),
        ("40", "1", "0.000", "419.8", "0.000", "419.8", "1.00x", "ok"),
    ]
    assert lines[1:] == [
        "prefill seq len 32 batch 2: 540.7 TFLOP/s (SDPA 540.7)",
        "prefill seq len 40 batch 1: 419.8 TFLOP/s (SDPA 419.8)",
    ]
    assert prefill.notes[0].startswith("FLOPs = 4 * 4 heads * 32 head dim * causal pairs, causal pairs = ")


def test_a_kernel_that_disagrees_with_sdpa_is_reported(monkeypatch: pytest.MonkeyPatch, device: torch.device) -> None:
    real = kernels_decode.paged_decode_attention

    def off_by_one(*args: object) -> torch.Tensor:
        return real(*args) + 1  # type: ignore[arg-type]

    monkeypatch.setattr(kernels_decode, "paged_decode_attention", off_by_one)
    plan = KernelBenchPlan(shape=TINY, decode=(DecodeCase(40, 1),), prefill=(), copy_bytes=1024)
    report = run_plan(plan, device, FixedTimer(1.0), "fixed")
    row = report.tables[1].rows[0]
    assert row[-1] == "FAILED"
    assert report.failures == [f"decode context 40 batch 1: max|diff| {row[-2]}"]
    assert 1.0 <= float(row[-2]) < 1.1


def test_compare_uses_the_bf16_tolerance() -> None:
    expected = torch.tensor([1.0, -2.0, 0.0])
    within = compare(expected + torch.tensor([0.05, 0.0, 0.0]), expected)  # 0.05 <= 0.03 + 0.02 * 1
    outside = compare(expected + torch.tensor([0.0, 0.0, 0.031]), expected)  # 0.031 > 0.03 + 0.02 * 0
    assert within.ok and within.max_abs_diff == pytest.approx(0.05)
    assert not outside.ok and outside.max_abs_diff == pytest.approx(0.031)
    with pytest.raises(ValueError, match=r"output shape \(2,\) differs from the baseline's \(3,\)"):
        compare(expected[:2], expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is the one without CUDA")
def test_without_cuda_the_step_skips_and_the_command_says_why(tmp_path: Path) -> None:
    with pytest.raises(Skip) as skip:
        gpu_check(tmp_path)
    assert str(skip.value) == (
        "no CUDA device here (torch.cuda.is_available() is False): the kernel benchmark measures a GPU"
    )
    assert str(skip.value) == NO_CUDA
    lines: list[str] = []
    assert run_kernel_bench(lines.append) == 0
    assert lines == [
        "kernel benchmark: no CUDA device here (torch.cuda.is_available() is False): the kernel benchmark "
        "measures a GPU (the kernels are tested on CPU with TRITON_INTERPRET=1)"
    ]
