"""`tandem bench guardrails` runs its variants side by side and checks each one's text."""

from __future__ import annotations

from pathlib import Path

from tandem.loadtest.bench.guardrails import VARIANTS, run_guardrails_bench


def test_the_bench_reports_every_variant_against_none(tiny_model_dir: Path) -> None:
    lines: list[str] = []
    ratios = run_guardrails_bench(tiny_model_dir, tokens=48, choices=2, rounds=1, out=lines.append)
    assert list(ratios) == list(VARIANTS) and ratios["none"] == 1.0
    assert all(r > 0 for r in ratios.values())
    assert lines[0] == "guardrails bench: 2 choices x 48 tokens, one token per delta, median of 1 rounds"
    assert lines[1].split() == ["variant", "deltas/s", "us/delta", "vs", "none"]
    assert [line.split()[0] for line in lines[2:]] == list(VARIANTS)
