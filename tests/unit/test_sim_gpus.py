"""The GPU table: every required type, datasheet figures with their sources, lookup by name."""

from __future__ import annotations

import pytest

from tandem.sim.gpus import GPUS, gpu


def test_the_table_holds_the_required_types() -> None:
    assert sorted(GPUS) == ["A100", "B200", "H100", "H200", "L40S"]


@pytest.mark.parametrize(
    ("name", "tflops", "tb_per_s", "gb"),
    [
        ("A100", 312.0, 2.039, 80),
        ("H100", 989.0, 3.35, 80),
        ("H200", 989.0, 4.8, 141),
        ("L40S", 362.05, 0.864, 48),
        ("B200", 2250.0, 8.0, 180),
    ],
)
def test_datasheet_figures(name: str, tflops: float, tb_per_s: float, gb: int) -> None:
    spec = GPUS[name]
    assert spec.peak_flops == pytest.approx(tflops * 1e12, rel=1e-12)
    assert spec.mem_bandwidth == pytest.approx(tb_per_s * 1e12, rel=1e-12)
    assert spec.memory_bytes == gb * 10**9
    assert spec.cost_per_hour_usd > 0
    assert "datasheet" in spec.source and name in spec.source and "price: indicative" in spec.source


def test_lookup_ignores_case_and_spaces() -> None:
    assert gpu(" h100 ") is GPUS["H100"]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"^Unknown GPU type 'V100'; known: A100, B200, H100, H200, L40S\.$"):
        gpu("V100")
