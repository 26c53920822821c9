"""Speculative decoding as operators see it: vLLM's `vllm:spec_decode_*` counters mirror the
engine's counters, the `tandem_spec_*` counters mirror the acceptance-aware draft length's
(`AdaptiveCounters`), and the heartbeat's load carries the acceptance that `tandem status` shows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tandem.common.metrics import WorkerMetrics
from tandem.engine import Engine, SamplingParams
from tandem.engine.outputs import EngineStats
from tandem.engine.spec.speculator import AdaptiveCounters
from tandem.worker.load import LoadMeter
from tests.conftest import random_prompts

LABELS = {"model_name": "tiny", "engine": "0", "worker_id": "d-0", "role": "decode"}


def _value(metrics: WorkerMetrics, name: str, **extra: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABELS, **extra})


def test_spec_counters_mirror_the_engine_by_delta() -> None:
    metrics = WorkerMetrics("d-0", "decode", "tiny", 256)
    meter = LoadMeter(metrics, 8)
    stats = EngineStats()
    engine: Any = SimpleNamespace(stats=stats, speculator=SimpleNamespace(counters=AdaptiveCounters()))
    meter.count_speculation(engine)
    assert _value(metrics, "vllm:spec_decode_num_drafts_total") == 0.0
    assert _value(metrics, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position="0") is None

    stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens = 3, 12, 7
    stats.spec_accepted_per_position = [3, 2, 2, 0]
    meter.count_speculation(engine)
    stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens = 5, 20, 10
    stats.spec_accepted_per_position = [5, 3, 2, 0]
    meter.count_speculation(engine)
    meter.count_speculation(engine)  # nothing new: nothing added

    assert _value(metrics, "vllm:spec_decode_num_drafts_total") == 5.0
    assert _value(metrics, "vllm:spec_decode_num_draft_tokens_total") == 20.0
    assert _value(metrics, "vllm:spec_decode_num_accepted_tokens_total") == 10.0
    per_position = [
        _value(metrics, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(4)
    ]
    assert per_position == [5.0, 3.0, 2.0, 0.0]  # every draft position has a series, even at 0
    assert sum(per_position) == _value(metrics, "vllm:spec_decode_num_accepted_tokens_total")


NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'
TANDEM_LABELS = {"worker_id": "d-0", "role": "decode"}


def _scraped(metrics: WorkerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels) -> value, as a Prometheus scrape of the worker's /metrics reads it."""
    body, _ = metrics.render()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_scraped_spec_counters_equal_the_engines_after_speculative_requests(tiny_model_dir: Path) -> None:
    """A real engine with the n-gram proposer on random prompts (low acceptance: the rule
    withholds drafts, skips steps and probes), mirrored after every step as the worker's tick
    does: every scraped counter equals the engine's own."""
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64, speculative_config=NGRAM)
    assert engine.speculator is not None
    metrics = WorkerMetrics("d-0", "decode", "tiny", 256)
    meter = LoadMeter(metrics, engine.pool.num_blocks)
    prompts = random_prompts([12, 20, 7], engine.model_config.vocab_size)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        meter.count_speculation(engine)
    meter.count_speculation(engine)  # nothing changed since the last step: nothing added

    stats, adaptive = engine.stats, engine.speculator.counters
    assert adaptive.withheld_tokens > 0 and adaptive.skipped_steps > 0 and adaptive.probes > 0
    assert stats.spec_num_drafts > 0
    scraped = _scraped(metrics)
    tandem = tuple(sorted(TANDEM_LABELS.items()))
    vllm = tuple(sorted(LABELS.items()))
    assert scraped[("tandem_spec_withheld_draft_tokens_total", tandem)] == adaptive.withheld_tokens
    assert scraped[("tandem_spec_skipped_steps_total", tandem)] == adaptive.skipped_steps
    assert scraped[("tandem_spec_probes_total", tandem)] == adaptive.probes
    assert scraped[("vllm:spec_decode_num_drafts_total", vllm)] == stats.spec_num_drafts
    assert scraped[("vllm:spec_decode_num_draft_tokens_total", vllm)] == stats.spec_num_draft_tokens
    assert scraped[("vllm:spec_decode_num_accepted_tokens_total", vllm)] == stats.spec_num_accepted_tokens
    per_position = [
        scraped[
            (
                "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                tuple(sorted({**LABELS, "position": str(i)}.items())),
            )
        ]
        for i in range(4)
    ]
    assert per_position == stats.spec_accepted_per_position


def test_an_engine_without_a_speculator_exports_the_counters_at_zero(tiny_model_dir: Path) -> None:
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    metrics = WorkerMetrics("d-0", "decode", "tiny", 256)
    meter = LoadMeter(metrics, engine.pool.num_blocks)
    engine.generate(random_prompts([9], engine.model_config.vocab_size), SamplingParams(max_tokens=4))
    meter.count_speculation(engine)
    scraped = _scraped(metrics)
    tandem = tuple(sorted(TANDEM_LABELS.items()))
    for name in (
        "tandem_spec_withheld_draft_tokens_total",
        "tandem_spec_skipped_steps_total",
        "tandem_spec_probes_total",
    ):
        assert scraped[(name, tandem)] == 0.0
    assert scraped[("vllm:spec_decode_num_drafts_total", tuple(sorted(LABELS.items())))] == 0.0
