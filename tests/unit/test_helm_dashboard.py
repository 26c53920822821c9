"""The chart's Grafana dashboard: shipped as a ConfigMap Grafana's sidecar loads, with the
panels issue 21 lists, and every query naming only metrics that the workers, the gateway or the
autoscaler export (collected from their real metric registries) or that the chart's own
recording rules make."""

from __future__ import annotations

import helm_python as helm
from prometheus_client import CollectorRegistry

from tandem.autoscaler.metrics import AutoscalerMetrics
from tandem.common.metrics import WorkerMetrics
from tandem.gateway.metrics import GatewayMetrics
from tests.unit.monitoring_chart import CHART_DIR, FULLNAME, NAMESPACE, RELEASE, metric_names, render_monitoring
from tests.unit.test_helm_chart import render

# Sample names of each metric type, from its family name (prometheus_client's exposition).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name `registry` can expose, labelled children or not yet."""
    return {family.name + suffix for family in registry.collect() for suffix in _SUFFIXES[family.type]}


def all_exported_names() -> set[str]:
    names: set[str] = set()
    for role in ("prefill", "decode"):
        worker = WorkerMetrics(f"{role}-0", role, "tiny-llama", 2048)
        worker.cache_config(block_size=16, num_blocks=64, cache_dtype="auto")
        names |= exported_names(worker.registry)
    names |= exported_names(GatewayMetrics("tiny-llama").registry)
    names |= exported_names(AutoscalerMetrics().registry)
    return names


def test_the_dashboard_ships_as_a_configmap_grafana_loads() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        (config_map,) = [
            o
            for o in render(chart, {"monitoring": {"dashboard": {"labels": {"team": "llm"}}}})
            if o["kind"] == "ConfigMap"
        ]
        off = chart.render({"monitoring": {"dashboard": {"enabled": False}}}, name=RELEASE, namespace=NAMESPACE)
    assert config_map["metadata"]["name"] == f"{FULLNAME}-dashboard"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["team"] == "llm"
    assert list(config_map["data"]) == ["tandem.json"]
    assert not [path for path, text in off.items() if path.endswith("dashboard.yaml") and text.strip()]


def test_the_dashboard_has_the_panels_of_issue_21() -> None:
    dashboard = render_monitoring().dashboard
    assert dashboard["uid"] == "tandem-serving"
    assert [panel["title"] for panel in dashboard["panels"]] == [
        "Time to first token (gateway)",
        "Inter-token latency (gateway)",
        "End-to-end request latency (gateway)",
        "TTFT breakdown by stage (mean)",
        "Tokens/s by pool",
        "Queue depth by pool",
        "Queue wait by pool",
        "KV cache usage by pool",
        "Prefix cache hit rate",
        "KV transfer bandwidth",
        "KV transfer failures and recomputes",
        "Routing decisions by kind",
        "Autoscaler replicas vs desired",
        "Cost per million tokens",
    ]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace", "model_name"]
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]


def test_pool_queries_group_by_the_workers_role_label() -> None:
    """Workers label their series worker_id and role (WorkerMetrics); the gateway's pool gauges
    use pool. A by-pool panel groups by one of those."""
    for query in render_monitoring().queries:
        if "by pool" in query.panel:
            assert "by (role)" in query.expr or "by (le, role)" in query.expr or "by (pool)" in query.expr, query


def test_metric_names_reads_promql() -> None:
    expr = (
        'sum by (le, role) (rate(vllm:x_bucket{a="b(c)",le="1.0"}[$__rate_interval])) * 1e6 / 3600 '
        '/ on (role) max(up) or label_replace(tandem_y, "role", "$1", "pool", "(.*)") > bool 0'
    )
    assert metric_names(expr) == {"vllm:x_bucket", "up", "tandem_y"}


def test_every_dashboard_query_names_only_exported_metrics() -> None:
    monitoring = render_monitoring()
    known = all_exported_names() | monitoring.recorded_names
    unknown = {
        f"{query.panel} {query.ref_id}": sorted(metric_names(query.expr) - known)
        for query in monitoring.queries
        if metric_names(query.expr) - known
    }
    assert unknown == {}
    assert all(metric_names(query.expr) for query in monitoring.queries)


def test_keda_and_rule_queries_name_only_exported_metrics() -> None:
    monitoring = render_monitoring()
    known = all_exported_names() | monitoring.recorded_names
    exprs = [*monitoring.keda_queries.values()]
    exprs += [rule["expr"] for group in monitoring.rules["groups"] for rule in group["rules"]]
    assert {name for expr in exprs for name in metric_names(expr)} - known == set()
