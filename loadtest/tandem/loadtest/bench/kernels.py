"""`tandem bench kernels` and the GPU check's kernels step: attention kernels on this GPU.

1. A device-to-device copy sets the bandwidth ceiling (`kernels_decode.measure_copy`).
2. Paged decode attention over a grid of contexts x batch sizes: GB/s and % of the copy, beside
   SDPA, each case checked against SDPA (`kernels_decode`).
3. Prefill attention TFLOP/s beside SDPA, checked the same way (`kernels_prefill`).

The measurement (`Timer`) is injected; everything after it is plain arithmetic on the times and
the tests run it on CPU with the interpreted kernels and a fixed time. Both entry points build
the same `Table`s: the GPU check puts them in its summary, `tandem bench kernels` prints them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.loadtest.bench.kernels_decode import (
    COPY_BYTES,
    SDPA_MAX_KV_BYTES,
    DecodeCase,
    copy_table,
    decode_cases,
    decode_table,
    measure_copy,
    measure_decode,
)
from tandem.loadtest.bench.kernels_inputs import AttentionShape, Timer
from tandem.loadtest.bench.kernels_prefill import PrefillCase, measure_prefill, prefill_cases, prefill_table
from tandem.loadtest.gpu.report import Table, markdown_table
from tandem.loadtest.gpu.steps import Skip, StepFailed

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): the kernel benchmark measures a GPU"
WARMUP_MS = 10
REP_MS = 40  # do_bench runs as many calls as fit in this time; 15 + 3 cases fit the step's 90 s
TIMING = (
    f"times: triton.testing.do_bench, mean over ~{REP_MS} ms of calls after {WARMUP_MS} ms of warm-up, "
    "CUDA events, L2 cache flushed before each call"
)


def do_bench_timer(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS))


@dataclass(frozen=True)
class KernelBenchPlan:
    """What one run measures; the default is the GPU check's (Llama-3-8B, bf16)."""

    shape: AttentionShape = field(default_factory=AttentionShape)
    decode: tuple[DecodeCase, ...] = field(default_factory=lambda: tuple(decode_cases()))
    prefill: tuple[PrefillCase, ...] = field(default_factory=lambda: tuple(prefill_cases()))
    copy_bytes: int = COPY_BYTES
    sdpa_max_kv_bytes: int = SDPA_MAX_KV_BYTES  # decode: larger batches are checked, not timed, by SDPA


@dataclass(frozen=True)
class KernelBenchReport:
    tables: list[Table]
    failures: list[str]  # one line per case whose output is not within tolerance of SDPA's


def run_plan(
    plan: KernelBenchPlan,
    device: torch.device,
    timer: Timer,
    timing: str,
    progress: Callable[[str], object] = lambda line: None,
) -> KernelBenchReport:
    """Measure every case of `plan` on `device` with `timer` (described by `timing`)."""
    copy = measure_copy(device, timer, plan.copy_bytes)
    progress(f"copy: {copy.gbps:.1f} GB/s")
    decode = []
    for case in plan.decode:
        decode.append(measure_decode(plan.shape, case, device, timer, plan.sdpa_max_kv_bytes))
        progress(f"decode context {case.context_len} batch {case.batch}: {decode[-1].triton_gbps:.1f} GB/s")
        _release(device)
    prefill = []
    for prefill_case in plan.prefill:
        prefill.append(measure_prefill(plan.shape, prefill_case, device, timer))
        progress(
            f"prefill seq len {prefill_case.seq_len} batch {prefill_case.batch}: "
            f"{prefill[-1].triton_tflops:.1f} TFLOP/s (SDPA {prefill[-1].sdpa_tflops:.1f})"
        )
        _release(device)
    failures = [
        f"decode context {r.case.context_len} batch {r.case.batch}: max|diff| {r.comparison.max_abs_diff:.2e}"
        for r in decode
        if not r.comparison.ok
    ]
    failures += [
        f"prefill seq len {r.case.seq_len} batch {r.case.batch}: max|diff| {r.comparison.max_abs_diff:.2e}"
        for r in prefill
        if not r.comparison.ok
    ]
    tables = [copy_table(copy, timing), decode_table(plan.shape, decode, copy, plan.sdpa_max_kv_bytes)]
    if prefill:
        tables.append(prefill_table(plan.shape, prefill))
    return KernelBenchReport(tables, failures)


def _release(device: torch.device) -> None:
    """Return a finished case's caches to the device, so a larger next case finds room."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _stamped(out: Callable[[str], object]) -> Callable[[str], object]:
    """Prefix each progress line with the seconds since the start: a step that overruns its
    limit shows in its log how far it got, and at what pace."""
    start = time.monotonic()
    return lambda line: out(f"[{time.monotonic() - start:5.1f} s] {line}")


def _print_now(line: str) -> None:
    print(line, flush=True)  # the step's output is a pipe: unflushed lines die with a killed step


def _cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        raise Skip(NO_CUDA)
    return torch.device("cuda", torch.cuda.current_device())


def gpu_check(work: Path) -> list[Table]:
    """The GPU check's kernels step; fails (with the tables) when a kernel disagrees with SDPA."""
    del work  # nothing to write: the figures are the tables
    report = run_plan(KernelBenchPlan(), _cuda_device(), do_bench_timer, TIMING, progress=_stamped(_print_now))
    if report.failures:
        raise StepFailed("kernel output differs from SDPA: " + "; ".join(report.failures), report.tables)
    return report.tables


def run_kernel_bench(out: Callable[[str], object] = print) -> int:
    """`tandem bench kernels`: print the tables; exit code 1 when a correctness check fails."""
    try:
        device = _cuda_device()
    except Skip as skip:
        out(f"kernel benchmark: {skip} (the kernels are tested on CPU with TRITON_INTERPRET=1)")
        return 0
    out(f"device {torch.cuda.get_device_name(device)}")
    report = run_plan(KernelBenchPlan(), device, do_bench_timer, TIMING, progress=_stamped(out))
    for table in report.tables:
        out("\n".join(["", *markdown_table(table)]))
    for failure in report.failures:
        out(f"FAILED: kernel output differs from SDPA: {failure}")
    return 1 if report.failures else 0
