"""A worker reports its resident weight bytes and quantization in its ready line and as the gauge
`tandem_model_weight_bytes`; `--quantization fp8` reaches the worker's engine."""

from __future__ import annotations

from pathlib import Path

from tandem.engine import Engine
from tests.integration.workers import STOP_TIMEOUT_S, metric_sum, metrics_port, start_worker


def test_ready_line_and_gauge_report_weight_bytes(tiny_model_dir: Path) -> None:
    expected = Engine.from_pretrained(tiny_model_dir, num_blocks=4, quantization="fp8")
    plain_bytes = Engine.from_pretrained(tiny_model_dir, num_blocks=4).weight_bytes
    assert expected.weight_bytes < plain_bytes
    worker = start_worker("prefill", tiny_model_dir, "--quantization", "fp8", worker_id="p-fp8")
    try:
        assert worker.ready is not None
        assert worker.ready["weight_bytes"] == expected.weight_bytes
        assert worker.ready["quantization"] == "fp8 (fp8_w8a8, 14 linear layers)"
        url = f"http://127.0.0.1:{metrics_port(worker)}/metrics"
        assert metric_sum(url, "tandem_model_weight_bytes", worker_id="p-fp8") == expected.weight_bytes
    finally:
        worker.stop(STOP_TIMEOUT_S)
