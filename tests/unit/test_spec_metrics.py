"""Speculative decoding as operators see it: vLLM's `vllm:spec_decode_*` counters mirror the
engine's counters, and the heartbeat's load carries the acceptance that `tandem status` shows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tandem.common.metrics import WorkerMetrics
from tandem.engine.outputs import EngineStats
from tandem.worker.load import LoadMeter

LABELS = {"model_name": "tiny", "engine": "0", "worker_id": "d-0", "role": "decode"}


def _value(metrics: WorkerMetrics, name: str, **extra: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABELS, **extra})


def test_spec_counters_mirror_the_engine_by_delta() -> None:
    metrics = WorkerMetrics("d-0", "decode", "tiny", 256)
    meter = LoadMeter(metrics, 8)
    stats = EngineStats()
    engine: Any = SimpleNamespace(stats=stats)
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
