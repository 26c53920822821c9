"""The `quantization` bench section (KV rows) in its quick size: the exact figures that follow
from the bench model's shape, and the measured ones within their goals."""

from __future__ import annotations

from pathlib import Path

from tandem.loadtest.suite import quantization
from tandem.loadtest.suite.context import BenchContext, write_bench_model
from tandem.loadtest.suite.run import SECTIONS


def test_quick_quantization_section(tmp_path: Path) -> None:
    assert SECTIONS["quantization"] == (
        "Quantized serving: FP8 KV cache and quantized weights",
        "tandem.loadtest.suite.quantization",
    )
    ctx = BenchContext(write_bench_model(tmp_path), tmp_path, lambda _: None, quick=True)
    section = quantization.run(ctx)
    figures = {f.name: f for f in section.figures}
    # bench model: 4 layers, 2 KV heads x 64 -> K+V 1024 values per token: 2048 bytes bf16, 1024 fp8
    assert figures["KV bytes per token, fp8 / bf16"].value == 0.5
    assert figures["max concurrent sequences at one KV budget, fp8 / bf16"].value == 2.0
    assert [row[:2] + row[5:7] for row in section.table[1:]] == [
        ("bf16", "2048", "2048", "64"),  # 64 MiB / 32 KiB blocks; 512-token sequences take 32 blocks
        ("fp8", "1024", "4096", "128"),
    ]
    assert [row[2] for row in section.table[1:]] == ["0.5", "0.2"]  # 16 full blocks of 256 tokens
    for row in section.table[1:]:  # median and p10..p90 of the interleaved pulls, in ms
        low, high = (float(ms) for ms in row[4].split(".."))
        assert 0 < low <= float(row[3]) <= high
    assert "median of 3 pulls each, bf16 and fp8 taking turns pull by pull after 1 warm-up rounds" in section.setup
    assert figures["teacher-forced argmax agreement, fp8 vs bf16"].met is True
    assert figures["mean |logprob error| of the chosen tokens"].met is True
    assert figures["decode tokens/s at concurrency 4, fp8 / bf16"].value > 0
    # weights: fp8 / int8 values plus float32 scales, about half of bf16 (exact bytes: test_quantized_checkpoints)
    weight_ratios = {name: f.value for name, f in figures.items() if name.startswith("resident weight bytes")}
    assert sorted(weight_ratios) == [
        "resident weight bytes, fp8 (load) / bf16",
        "resident weight bytes, fp8 w8a8 / bf16",
        "resident weight bytes, int8 w8a16 (channel) / bf16",
        "resident weight bytes, int8 w8a16 (group 128) / bf16",
    ]
    assert all(0.5 < ratio < 0.6 for ratio in weight_ratios.values())
    assert section.notes[0].split()[:3] == ["weights", "resident", "MiB"]
    assert [line.split()[0] for line in section.notes[1:]] == ["bf16", "fp8", "int8", "int8", "fp8"]
