"""A colocated cluster (one decode worker, no prefill pool) behind a gateway: every request
prefills locally, the gateway's TTFT breakdown has a prefill stage for it, and the worker's
vLLM series count the request exactly once, with the gateway's served model name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster, gateway_metric
from tests.e2e.test_gateway_errors import post
from tests.integration.workers import metric_sum, metrics_port

PROMPT = list(range(5, 40))  # 35 tokens: under the local-prefill threshold
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def colocated(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, ChildProcess]]:
    trace_file = tmp_path_factory.mktemp("colocated") / "spans.jsonl"
    cluster = Cluster.start(tiny_model_dir, trace_file, num_prefill=0, num_decode=1)
    try:
        gateway = cluster.gateway()
        try:
            yield cluster, gateway
        finally:
            gateway.stop(GATEWAY_STOP_TIMEOUT_S)
    finally:
        cluster.stop()


def _stages(gateway: ChildProcess) -> dict[str, float]:
    stages = ("route", "prefill_queue", "prefill_compute", "transfer", "decode_admission")
    return {s: gateway_metric(gateway, "tandem_ttft_stage_seconds_count", stage=s) for s in stages}


def test_a_local_prefill_records_its_prefill_stage_and_vllm_series(colocated) -> None:
    cluster, gateway = colocated
    model = cluster.model_dir.name
    worker_url = f"http://127.0.0.1:{metrics_port(cluster.decode[0])}/metrics"
    before = _stages(gateway)
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    status, _, answer = post(gateway.address, "/v1/completions", json.dumps(body).encode())
    assert status == 200 and answer["usage"]["completion_tokens"] == MAX_TOKENS
    after = _stages(gateway)
    assert {s: after[s] - before[s] for s in after} == {
        "route": 1,
        "prefill_queue": 0,
        "prefill_compute": 1,
        "transfer": 0,
        "decode_admission": 1,
    }
    assert gateway_metric(gateway, "tandem_routing_decisions_total", kind="local_prefill") == 1
    # the worker's series: this is the module's only request
    assert metric_sum(worker_url, "vllm:request_success_total", model_name=model, finished_reason="length") == 1
    assert metric_sum(worker_url, "vllm:prompt_tokens_total", model_name=model) == len(PROMPT)
    assert metric_sum(worker_url, "vllm:generation_tokens_total", model_name=model) == MAX_TOKENS
    assert metric_sum(worker_url, "vllm:time_to_first_token_seconds_count", model_name=model) == 1
    assert metric_sum(worker_url, "vllm:inter_token_latency_seconds_count", model_name=model) == MAX_TOKENS - 1
    assert metric_sum(worker_url, "tandem_requests_finished_total", reason="length") == 1
