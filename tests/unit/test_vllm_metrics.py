"""vLLM's metric set on a worker: the buckets, the per-request recorder's exact values on each
path (colocated, disaggregated prefill and decode), the per-step series, and the names that
must survive a Prometheus scrape under every Accept header Prometheus sends."""

from __future__ import annotations

import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

from tandem.common.metrics import WorkerMetrics
from tandem.common.request import FinishReason
from tandem.common.vllm_metrics import ITL_BUCKETS, build_1_2_5_buckets, observe_all
from tandem.engine.outputs import EngineStats, RequestOutput
from tandem.gateway.metrics import GatewayMetrics
from tandem.worker.load import LoadMeter
from tandem.worker.request_metrics import RequestRecorder

LABELS = {"model_name": "tiny-llama", "engine": "0", "worker_id": "w-0", "role": "decode"}

# What Prometheus sends as Accept when it scrapes (scrape/scrape.go): 2.42's default, 2.42 with
# native histograms on, before 2.33, and 2.5x/3.x's with an escaping scheme; and no header.
PROMETHEUS_ACCEPT = [
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,"
    "application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "",
]


def _metrics(role: str = "decode") -> WorkerMetrics:
    return WorkerMetrics("w-0", role, "tiny-llama", 2048)


def _value(m: WorkerMetrics, name: str, role: str = "decode", **extra: str) -> float | None:
    return m.registry.get_sample_value(name, {**LABELS, "role": role, **extra})


def _out(tokens: tuple[int, ...], reason: FinishReason | None = None, scheduled_s: float = 10.5, cached: int = 0):
    return RequestOutput("r", tokens, (), reason, scheduled_s, cached)


def test_token_buckets_are_vllms_1_2_5_series() -> None:
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    assert build_1_2_5_buckets(1) == (1,)


def test_colocated_request_records_every_series_once() -> None:
    m = _metrics()
    rec = RequestRecorder(m.vllm, arrival_s=10.0, num_prompt_tokens=40, max_tokens=3)
    rec.record(_out((7,), cached=32), 11.0)  # first token: queue 0.5 s, prefill 0.5 s, TTFT 1 s
    rec.record(_out((8,)), 11.25)
    rec.record(_out((9,), FinishReason.LENGTH), 11.75)
    assert _value(m, "vllm:generation_tokens_total") == 0  # batched until the loop's flush
    assert _value(m, "vllm:inter_token_latency_seconds_count") == 0
    m.vllm.flush()
    v = lambda name, **kw: _value(m, name, **kw)  # noqa: E731
    assert v("vllm:prompt_tokens_total") == 40
    assert v("vllm:generation_tokens_total") == 3
    assert v("vllm:prefix_cache_queries_total") == 40
    assert v("vllm:prefix_cache_hits_total") == 32
    assert v("vllm:time_to_first_token_seconds_count") == 1
    assert v("vllm:time_to_first_token_seconds_sum") == 1.0
    assert v("vllm:request_queue_time_seconds_sum") == 0.5
    assert v("vllm:request_prefill_time_seconds_sum") == 0.5
    assert v("vllm:inter_token_latency_seconds_count") == 2
    assert v("vllm:inter_token_latency_seconds_sum") == 0.75
    assert v("vllm:e2e_request_latency_seconds_sum") == 1.75
    assert v("vllm:request_decode_time_seconds_sum") == 0.75
    assert v("vllm:request_success_total", finished_reason="length") == 1
    assert v("vllm:request_success_total", finished_reason="stop") == 0
    assert v("vllm:request_success_total", finished_reason="abort") == 0
    assert v("vllm:request_prompt_tokens_sum") == 40
    assert v("vllm:request_prompt_tokens_bucket", le="50.0") == 1
    assert v("vllm:request_prompt_tokens_bucket", le="20.0") == 0
    assert v("vllm:request_generation_tokens_sum") == 3
    assert v("vllm:request_max_num_generation_tokens_sum") == 3
    assert v("vllm:request_max_num_generation_tokens_count") == 1
    # the deprecated name that vLLM's dashboards still query, observed with its successor
    assert v("vllm:time_per_output_token_seconds_count") == 2
    assert v("vllm:time_per_output_token_seconds_sum") == 0.75
    assert v("vllm:time_to_first_token_seconds_bucket", le="1.0") == 1
    assert v("vllm:time_to_first_token_seconds_bucket", le="0.75") == 0


def test_disaggregated_request_is_counted_once_across_the_pools() -> None:
    p, d = _metrics("prefill"), _metrics("decode")
    on_p = RequestRecorder(p.vllm, arrival_s=10.0, num_prompt_tokens=40)
    on_p.record(_out((7,), FinishReason.HANDOFF, cached=16), 10.75)
    on_d = RequestRecorder(d.vllm, 20.0, 40, num_prior_output_tokens=1, prefilled_elsewhere=True)
    on_d.record(_out((8,), scheduled_s=20.1), 20.5)  # the gap from D's arrival is the first ITL
    on_d.record(_out((9, 10), FinishReason.STOP), 20.75)  # two tokens in one output: one ITL
    p.vllm.flush()
    d.vllm.flush()
    vp = lambda name, **kw: _value(p, name, "prefill", **kw)  # noqa: E731
    vd = lambda name, **kw: _value(d, name, "decode", **kw)  # noqa: E731
    # the prompt's series on P only
    assert (vp("vllm:prompt_tokens_total"), vd("vllm:prompt_tokens_total")) == (40, 0)
    assert (vp("vllm:prefix_cache_queries_total"), vd("vllm:prefix_cache_queries_total")) == (40, 0)
    assert (vp("vllm:prefix_cache_hits_total"), vd("vllm:prefix_cache_hits_total")) == (16, 0)
    assert (vp("vllm:time_to_first_token_seconds_sum"), vd("vllm:time_to_first_token_seconds_count")) == (0.75, 0)
    assert vp("vllm:request_queue_time_seconds_sum") == 0.5
    assert vp("vllm:request_prefill_time_seconds_sum") == 0.25
    assert vd("vllm:request_queue_time_seconds_count") == 0
    # tokens: P sampled the first, D the other three
    assert (vp("vllm:generation_tokens_total"), vd("vllm:generation_tokens_total")) == (1, 3)
    # the end of the request on D only
    assert vp("vllm:request_success_total", finished_reason="stop") == 0
    assert vp("vllm:e2e_request_latency_seconds_count") == 0
    assert vp("vllm:inter_token_latency_seconds_count") == 0
    assert vd("vllm:request_success_total", finished_reason="stop") == 1
    assert vd("vllm:inter_token_latency_seconds_count") == 2
    assert vd("vllm:inter_token_latency_seconds_sum") == 0.75
    assert vd("vllm:e2e_request_latency_seconds_sum") == 0.75
    assert vd("vllm:request_decode_time_seconds_sum") == 0.75
    assert vd("vllm:request_generation_tokens_sum") == 4
    assert vd("vllm:request_prompt_tokens_sum") == 40


def test_first_token_that_ends_the_request_ends_it_on_the_prefill_worker() -> None:
    p = _metrics("prefill")
    RequestRecorder(p.vllm, 10.0, 5).record(_out((2,), FinishReason.STOP), 10.5)
    assert _value(p, "vllm:request_success_total", "prefill", finished_reason="stop") == 1
    assert _value(p, "vllm:request_decode_time_seconds_sum", "prefill") == 0.0
    assert _value(p, "vllm:request_generation_tokens_sum", "prefill") == 1


def test_abort_before_any_token_counts_an_abort_and_no_prompt() -> None:
    m = _metrics()
    RequestRecorder(m.vllm, 10.0, 5).record(_out((), FinishReason.ABORT, scheduled_s=10.2), 10.5)
    assert _value(m, "vllm:request_success_total", finished_reason="abort") == 1
    assert _value(m, "vllm:prompt_tokens_total") == 0
    assert _value(m, "vllm:time_to_first_token_seconds_count") == 0
    assert _value(m, "vllm:request_generation_tokens_sum") == 0


def test_batched_observations_expose_exactly_what_one_by_one_observations_do() -> None:
    """`observe_all` (the flush of the per-output batch) against `Histogram.observe` per value:
    the same bucket counts, count and bit-identical sum, bucket bounds included (a value equal
    to a bound lands in that bound's bucket), over two batches."""
    values = [0.0, 0.01, 0.0100001, 0.3, 0.1 + 0.2, 0.7, 80.0, 80.5, 1e-9, 0.011, 0.07, 2.5]
    values += [v / 7 for v in range(1, 200)]
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    a = Histogram("itl", "help", ["w"], buckets=ITL_BUCKETS, registry=one_by_one).labels(w="0")
    b = Histogram("itl", "help", ["w"], buckets=ITL_BUCKETS, registry=batched).labels(w="0")
    for batch in (values[:7], values[7:]):
        for v in batch:
            a.observe(v)
        observe_all(batch, b)
    strip = lambda text: [line for line in text.decode().splitlines() if "_created" not in line]  # noqa: E731
    assert strip(generate_latest(batched)) == strip(generate_latest(one_by_one))
    assert batched.get_sample_value("itl_bucket", {"w": "0", "le": "0.01"}) == 3  # 0.0, 1e-9 and 0.01
    assert batched.get_sample_value("itl_count", {"w": "0"}) == len(values)
    other = Histogram("tpot", "help", buckets=(0.5, 1.0), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="the histograms' buckets differ"):
        observe_all([0.1], b, other)


def test_steps_and_preemptions_by_delta() -> None:
    m = _metrics()
    meter = LoadMeter(m, 8)
    stats = EngineStats()
    engine: Any = SimpleNamespace(stats=stats)
    stats.num_steps, stats.num_computed_tokens = 1, 40
    meter.count_steps(engine)
    meter.count_steps(engine)  # no step since: nothing observed
    stats.num_steps, stats.num_computed_tokens, stats.num_preemptions = 2, 42, 1
    meter.count_steps(engine)
    assert _value(m, "vllm:iteration_tokens_total_count") == 2
    assert _value(m, "vllm:iteration_tokens_total_sum") == 42
    assert _value(m, "vllm:iteration_tokens_total_bucket", le="1.0") == 0
    assert _value(m, "vllm:iteration_tokens_total_bucket", le="8.0") == 1
    assert _value(m, "vllm:num_preemptions_total") == 1


def test_cache_config_info_has_vllms_labels() -> None:
    m = _metrics()
    m.cache_config(16, 512, "fp8")
    config = {"block_size": "16", "num_gpu_blocks": "512", "cache_dtype": "fp8", "enable_prefix_caching": "True"}
    assert _value(m, "vllm:cache_config_info", **config) == 1


def _families(body: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(body)}


@pytest.mark.parametrize("accept", PROMETHEUS_ACCEPT)
def test_vllm_names_survive_every_accept_header(accept: str) -> None:
    m = _metrics()
    RequestRecorder(m.vllm, 10.0, 4).record(_out((1,), FinishReason.LENGTH), 10.5)
    port = m.serve("127.0.0.1", 0)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        content_type = response.headers["Content-Type"]
        body = response.read().decode()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    families = _families(body)
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert families["vllm:num_requests_running"].type == "gauge"
    assert families["vllm:prompt_tokens"].type == "counter"
    assert samples["vllm:prompt_tokens_total"].value == 4
    assert samples["vllm:prompt_tokens_total"].labels == LABELS
    assert samples["vllm:time_to_first_token_seconds_count"].value == 1
    assert not [name for name in samples if name.startswith("vllm_")]


def test_the_libraries_own_negotiation_would_lose_the_colons() -> None:
    """Why /metrics does not negotiate: the client's OpenMetrics writer, which Prometheus 2.42's
    default Accept header selects, rewrites `vllm:` to `vllm_` in every sample name."""
    m = _metrics()
    encoder, content_type = choose_encoder(PROMETHEUS_ACCEPT[0])
    assert content_type.startswith("application/openmetrics-text")
    body = encoder(m.registry).decode()
    assert "\nvllm_num_requests_running{" in body
    assert "\nvllm:num_requests_running{" not in body


def test_other_paths_are_not_found() -> None:
    port = _metrics().serve("127.0.0.1", 0)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    assert info.value.code == 404


def test_the_gateway_answers_text_0_0_4_too() -> None:
    body, content_type = GatewayMetrics("tiny-llama").render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    families = _families(body.decode())
    assert families["tandem_ttft_stage_seconds"].type == "histogram"
    assert {s.labels["model_name"] for s in families["tandem_ttft_stage_seconds"].samples} == {"tiny-llama"}


def test_kv_usage_is_published_under_both_names() -> None:
    m = _metrics()
    m.vllm.set_kv_cache_usage(0.25)
    assert _value(m, "vllm:kv_cache_usage_perc") == 0.25
    assert _value(m, "vllm:gpu_cache_usage_perc") == 0.25
