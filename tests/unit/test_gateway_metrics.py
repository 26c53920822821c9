"""GatewayMetrics: exact sample values read back from the Prometheus text exposition."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.gateway.metrics import SECONDS_BUCKETS, GatewayMetrics, RoutingKind, TTFTStage

MODEL = {"model_name": "tiny-llama"}


def samples(metrics: GatewayMetrics) -> dict[tuple[str, frozenset], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(all_samples: dict, name: str, **labels: str) -> float:
    return all_samples[(name, frozenset({**MODEL, **labels}.items()))]


def test_fresh_metrics_show_fixed_series_at_zero():
    s = samples(GatewayMetrics("tiny-llama"))
    for stage in ("route", "prefill_queue", "prefill_compute", "transfer", "decode_admission"):
        assert value(s, "tandem_ttft_stage_seconds_count", stage=stage) == 0
    for pool in ("prefill", "decode"):
        assert value(s, "tandem_queue_depth", pool=pool) == 0
        assert value(s, "tandem_workers", pool=pool) == 0
    for name in (
        "tandem_prompt_tokens_total",
        "tandem_generation_tokens_total",
        "tandem_prefix_cache_query_tokens_total",
        "tandem_prefix_cache_hit_tokens_total",
        "tandem_prefill_retries_total",
        "tandem_client_disconnects_total",
        "tandem_prefix_cache_hit_ratio",
        "tandem_time_to_first_token_seconds_count",
    ):
        assert value(s, name) == 0
    assert not any(name == "tandem_requests_total" for name, _ in s)
    assert SECONDS_BUCKETS[0] == 0.001 and SECONDS_BUCKETS[-1] == 60.0


def test_latency_histograms_exact():
    m = GatewayMetrics("tiny-llama")
    m.observe_ttft(0.05)
    m.observe_ttft(0.3)
    m.observe_itl(0.02)
    m.observe_itl(0.02)
    m.observe_itl(0.0005)
    m.observe_e2e(61.0)
    m.observe_stage(TTFTStage.TRANSFER, 0.004)
    m.observe_stage("route", 0.001)
    s = samples(m)
    assert value(s, "tandem_time_to_first_token_seconds_count") == 2
    assert value(s, "tandem_time_to_first_token_seconds_sum") == pytest.approx(0.35)
    assert value(s, "tandem_time_to_first_token_seconds_bucket", le="0.04") == 0
    assert value(s, "tandem_time_to_first_token_seconds_bucket", le="0.06") == 1
    assert value(s, "tandem_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value(s, "tandem_time_to_first_token_seconds_bucket", le="0.5") == 2
    assert value(s, "tandem_inter_token_latency_seconds_count") == 3
    assert value(s, "tandem_inter_token_latency_seconds_bucket", le="0.001") == 1
    assert value(s, "tandem_inter_token_latency_seconds_bucket", le="0.02") == 3  # le is inclusive
    assert value(s, "tandem_e2e_request_latency_seconds_bucket", le="60.0") == 0
    assert value(s, "tandem_e2e_request_latency_seconds_bucket", le="+Inf") == 1
    assert value(s, "tandem_e2e_request_latency_seconds_sum") == 61.0
    assert value(s, "tandem_ttft_stage_seconds_count", stage="transfer") == 1
    assert value(s, "tandem_ttft_stage_seconds_bucket", stage="transfer", le="0.0025") == 0
    assert value(s, "tandem_ttft_stage_seconds_bucket", stage="transfer", le="0.005") == 1
    assert value(s, "tandem_ttft_stage_seconds_bucket", stage="route", le="0.001") == 1
    assert value(s, "tandem_ttft_stage_seconds_count", stage="prefill_queue") == 0


def test_counters_and_gauges_exact():
    m = GatewayMetrics("tiny-llama")
    m.routed(RoutingKind.DISAGGREGATED, "prefix_aware")
    m.routed("disaggregated", "prefix_aware")
    m.routed("local_prefill", "prefix_aware")
    m.routed("local_prefill", "round_robin")
    m.request_done("/v1/completions", 200)
    m.request_done("/v1/completions", 200)
    m.request_done("/v1/chat/completions", 429)
    m.tokens(prompt=100, generated=20)
    m.tokens(prompt=7, generated=0)
    m.prefill_retry()
    m.client_disconnect()
    m.client_disconnect()
    m.set_pools(prefill_waiting=5, decode_waiting=2, num_prefill=3, num_decode=4)
    m.set_pools(prefill_waiting=1, decode_waiting=0, num_prefill=2, num_decode=4)
    s = samples(m)
    assert value(s, "tandem_routing_decisions_total", kind="disaggregated", policy="prefix_aware") == 2
    assert value(s, "tandem_routing_decisions_total", kind="local_prefill", policy="prefix_aware") == 1
    assert value(s, "tandem_routing_decisions_total", kind="local_prefill", policy="round_robin") == 1
    assert value(s, "tandem_requests_total", endpoint="/v1/completions", status="200") == 2
    assert value(s, "tandem_requests_total", endpoint="/v1/chat/completions", status="429") == 1
    assert value(s, "tandem_prompt_tokens_total") == 107
    assert value(s, "tandem_generation_tokens_total") == 20
    assert value(s, "tandem_prefill_retries_total") == 1
    assert value(s, "tandem_client_disconnects_total") == 2
    assert value(s, "tandem_queue_depth", pool="prefill") == 1
    assert value(s, "tandem_queue_depth", pool="decode") == 0
    assert value(s, "tandem_workers", pool="prefill") == 2
    assert value(s, "tandem_workers", pool="decode") == 4


def test_prefix_hit_ratio_is_cumulative_hits_over_queries():
    m = GatewayMetrics("tiny-llama")
    m.prefix(query_tokens=0, hit_tokens=0)
    assert value(samples(m), "tandem_prefix_cache_hit_ratio") == 0
    m.prefix(query_tokens=64, hit_tokens=48)
    assert value(samples(m), "tandem_prefix_cache_hit_ratio") == 0.75
    m.prefix(query_tokens=64, hit_tokens=0)
    s = samples(m)
    assert value(s, "tandem_prefix_cache_query_tokens_total") == 128
    assert value(s, "tandem_prefix_cache_hit_tokens_total") == 48
    assert value(s, "tandem_prefix_cache_hit_ratio") == 0.375


def test_bad_values_are_rejected_and_record_nothing():
    m = GatewayMetrics("tiny-llama")
    for call in (
        lambda: m.observe_ttft(-0.1),
        lambda: m.observe_itl(float("nan")),
        lambda: m.observe_stage("queue", 0.1),
        lambda: m.routed("remote", "p"),
        lambda: m.request_done("/v1/models", 1000),
        lambda: m.tokens(-1, 0),
        lambda: m.prefix(10, 11),
        lambda: m.set_pools(0, -1, 0, 0),
    ):
        with pytest.raises(ValueError):
            call()
    s = samples(m)
    assert value(s, "tandem_time_to_first_token_seconds_count") == 0
    assert value(s, "tandem_prompt_tokens_total") == 0
    assert value(s, "tandem_prefix_cache_query_tokens_total") == 0
    assert not any(name == "tandem_routing_decisions_total" for name, _ in s)


def test_each_instance_has_its_own_registry():
    a, b = GatewayMetrics("a"), GatewayMetrics("b")
    a.tokens(3, 4)
    assert samples(b)[("tandem_prompt_tokens_total", frozenset({"model_name": "b"}.items()))] == 0
    with pytest.raises(ValueError):
        GatewayMetrics("")
