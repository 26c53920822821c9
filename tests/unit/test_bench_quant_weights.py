"""The quantized-weights bench helper: its quality measure on known logits, and one small run."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tandem.loadtest.bench.quant_weights import teacher_forced_quality, weight_rows


def test_teacher_forced_quality_exact() -> None:
    # prompt_len 2, 4 tokens: rows 1 and 2 predict the output tokens
    ref = torch.tensor([[9.0, 0.0], [2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    cand = torch.tensor([[0.0, 9.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    agreement, error = teacher_forced_quality([ref], [cand], prompt_len=2)
    assert agreement == 0.5
    # row 1: identical (error 0); row 2: chosen token 1, log p = log sigmoid(1) vs log sigmoid(-1)
    expected = abs(math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert abs(error - expected) < 1e-6


def test_weight_rows_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = weight_rows(tiny_model_dir, tmp_path, num_prompts=2, prompt_len=8, new_tokens=8, group_size=32)
    names = [r.name for r in rows]
    assert names == ["bf16", "fp8 w8a8", "int8 w8a16 (channel)", "int8 w8a16 (group 32)", "fp8 (load)"]
    assert rows[0].ratio_to_bf16 == 1.0 and rows[0].argmax_agreement is None
    by_name = {r.name: r for r in rows}
    # load-time fp8 is the FP8_DYNAMIC checkpoint, figure for figure
    assert by_name["fp8 (load)"].cells()[1:] == by_name["fp8 w8a8"].cells()[1:]
    for row in rows[1:]:
        assert row.ratio_to_bf16 < 1.0
        assert row.argmax_agreement is not None and 0.0 <= row.argmax_agreement <= 1.0
