"""The CPU cost model: the fit recovers known coefficients, JSON round-trips, and a tiny real
calibration on the engine times the shapes it claims."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tandem.engine.engine import Engine
from tandem.engine.tiny_model import write_tiny_llama
from tandem.loadtest.sim_calibration import CalibrationGrid, StepTimer, calibrate, fastest_of_rounds
from tandem.sim.calibrate import CalibratedCostModel, Coefficients, StepTiming, fit, load, save
from tandem.sim.costmodel import Link
from tandem.sim.types import CostModel, StepShape

KNOWN = Coefficients(step_s=2e-3, token_s=5e-5, decode_seq_s=1e-4, prefill_context_s=2e-8, decode_context_s=3e-7)


def _grid() -> list[StepShape]:
    prefills = [
        StepShape(prefill_tokens=n, prefill_context_tokens=o * n + n * (n + 1) // 2)
        for n in (16, 128, 512)
        for o in (0, 256)
    ]
    decodes = [
        StepShape(decode_seqs=b, decode_context_tokens=b * c) for b, c in itertools.product((1, 8, 32), (32, 256))
    ]
    return prefills + decodes


def test_fit_recovers_known_coefficients() -> None:
    timings = [StepTiming(s, KNOWN.seconds(s)) for s in _grid()]
    model = fit(timings, "synthetic", kv_bytes=4096)
    for name in ("step_s", "token_s", "decode_seq_s", "prefill_context_s", "decode_context_s"):
        assert getattr(model.coefficients, name) == pytest.approx(getattr(KNOWN, name), rel=1e-6)
    assert model.max_relative_error < 1e-9
    assert model.num_timings == 12


def test_a_term_that_would_be_negative_is_dropped() -> None:
    # decode steps get faster with more context: impossible, so that term is 0 and the rest refit
    timings = [StepTiming(s, KNOWN.seconds(s) - 4e-7 * s.decode_context_tokens) for s in _grid()]
    coefficients = fit(timings, "synthetic", kv_bytes=1).coefficients
    assert coefficients.decode_context_s == 0.0
    assert min(coefficients.step_s, coefficients.token_s, coefficients.decode_seq_s) >= 0.0


def test_fit_minimises_the_relative_error() -> None:
    # step = s + t x tokens on 1, 1, 2, 2 and 5 tokens taking 1, 1, 2, 2 and 4 ms: no line fits
    # all five. Weighting each residual by 1/measured, the normal equations in (s + t, t), with
    # n = tokens - 1 = 0, 0, 1, 1, 4, are [[41/16, 3/4], [3/4, 3/2]] x = [13/4, 2]: s + t = 36/35
    # and t = 86/105 ms, so s = 22/105 ms. (Unweighted, the 4 ms step pulls it to s = 10/27 and
    # t = 20/27 ms, and the 1 ms steps come out 11% off instead of 3%.)
    timings = [StepTiming(StepShape(prefill_tokens=n), ms * 1e-3) for n, ms in ((1, 1), (1, 1), (2, 2), (2, 2), (5, 4))]
    model = fit(timings, "synthetic", kv_bytes=1)
    c = model.coefficients
    assert (c.step_s, c.token_s) == pytest.approx((22 / 105 * 1e-3, 86 / 105 * 1e-3), rel=1e-12, abs=0)
    assert (c.decode_seq_s, c.prefill_context_s, c.decode_context_s) == (0.0, 0.0, 0.0)
    # the worst row: the 2 ms steps, predicted (22 + 2 x 86) / 105 = 194/105 ms
    assert model.max_relative_error == pytest.approx(1 - 194 / 210, rel=1e-12)


def test_fit_needs_enough_positive_timings() -> None:
    with pytest.raises(ValueError, match=r"^a fit needs at least 5 timings, got 1$"):
        fit([StepTiming(StepShape(prefill_tokens=1), 1.0)], "m", 1)
    with pytest.raises(ValueError, match=r"^step times must be positive numbers of seconds, got \[0\.0\]$"):
        fit([StepTiming(s, 0.0 if i == 0 else 1.0) for i, s in enumerate(_grid())], "m", 1)


def test_model_answers_the_cost_model_protocol() -> None:
    model: CostModel = CalibratedCostModel("m", KNOWN, kv_bytes=4096, link=Link(bandwidth=1e6, latency_s=0.01))
    assert model.step_seconds(StepShape()) == 0.0
    assert model.step_seconds(StepShape(decode_seqs=2, decode_context_tokens=100)) == pytest.approx(
        2e-3 + 2 * 5e-5 + 2 * 1e-4 + 100 * 3e-7
    )
    assert model.transfer_seconds(10**6) == pytest.approx(1.01)
    assert model.kv_bytes_per_token() == 4096


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = CalibratedCostModel("bench", KNOWN, 4096, Link(2e9, 5e-4), max_relative_error=0.07, num_timings=40)
    save(model, tmp_path / "cpu.json")
    assert load(tmp_path / "cpu.json") == model
    (tmp_path / "old.json").write_text('{"format_version": 0}')
    with pytest.raises(ValueError, match=r"old\.json: ValueError\('format_version must be 1, got 0'\)$"):
        load(tmp_path / "old.json")


def test_repeats_are_rounds_over_every_measurement() -> None:
    calls: list[str] = []
    seconds = {"a": iter([0.5, 0.2, 0.4]), "b": iter([0.1, 0.3, 0.05])}

    def measure(name: str, tokens: int) -> list[StepTiming]:
        calls.append(name)
        return [StepTiming(StepShape(prefill_tokens=tokens), next(seconds[name]))]

    fastest = fastest_of_rounds([lambda: measure("a", 1), lambda: measure("b", 2)], rounds=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # a burst of load slows one round of each, not all
    assert fastest == [StepTiming(StepShape(prefill_tokens=1), 0.2), StepTiming(StepShape(prefill_tokens=2), 0.05)]
    with pytest.raises(RuntimeError, match=r"^a measurement's rounds timed different shapes"):
        sizes = iter([1, 2])
        fastest_of_rounds([lambda: [StepTiming(StepShape(prefill_tokens=next(sizes)), 1.0)]], rounds=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def test_timer_records_the_shapes_it_runs(tiny_dir: Path) -> None:
    timer = StepTimer(Engine.from_pretrained(tiny_dir, enable_prefix_caching=False, max_prefill_chunk_tokens=4), seed=0)
    # 8 prompt tokens in chunks of 4: contexts 1..4 (10), then 5..8 (26)
    assert [t.step for t in timer.prefill(8, 4)] == [
        StepShape(prefill_tokens=4, prefill_context_tokens=10),
        StepShape(prefill_tokens=4, prefill_context_tokens=26),
    ]
    # 2 prompts of 4 tokens, each with its first token: 2 x 5, then 2 x 6 attended tokens
    assert [t.step for t in timer.decode(2, 4, 2)] == [
        StepShape(decode_seqs=2, decode_context_tokens=10),
        StepShape(decode_seqs=2, decode_context_tokens=12),
    ]
    assert not timer.engine.has_unfinished()
    timer.engine.check_integrity()


def test_a_tiny_real_calibration_round_trips(tiny_dir: Path, tmp_path: Path) -> None:
    grid = CalibrationGrid((4, 8), 4, (1, 2), (4, 8), decode_steps=2, repeats=1)
    model = calibrate(tiny_dir, grid)
    assert model.model_name == "tiny"
    assert model.num_timings == 2 + 2 + 2 * 2 * 2  # prefills, the chunked prompt's chunks, decode steps
    assert model.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
    assert model.step_seconds(StepShape(prefill_tokens=8, prefill_context_tokens=36)) > 0
    save(model, tmp_path / "tiny.json")
    assert load(tmp_path / "tiny.json") == model
