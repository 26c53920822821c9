"""A real Prometheus (Debian's `prometheus`; .ci/run installs it) scraping a `tandem up`
cluster: 1 prefill + 1 decode worker (every request disaggregated), its gateway, and a
`tandem autoscaler` (against the stand-in Kubernetes API of tests/integration/kube_api.py) on
the same Redis. Prometheus loads the chart's rendered PrometheusRule groups and scrapes every
target each second, with the labels a ServiceMonitor scrape adds (namespace, service) as
static labels. After a short, bounded load, every dashboard query, both KEDA trigger queries
and a handful of the queries vLLM's own Grafana dashboard uses are evaluated through
/api/v1/query: each must return series with the labels its legend names, and a finite value.
Skipped, saying why, where the prometheus binary is absent. Everything is stopped by pid."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_up import REPO_ROOT, UpProcess, free_port, started, wait_until  # noqa: F401 (fixture)
from tests.integration.kube_api import FakeKubeApi
from tests.unit.monitoring_chart import FULLNAME, NAMESPACE, render_monitoring

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus; .ci/run does it)"
    ),
]
NUM_REQUESTS = 12
STOP_TIMEOUT_S = 20.0
# Queries from vLLM's Grafana dashboards (vllm-project/vllm
# examples/online_serving/prometheus_grafana/grafana.json and k8s-monitoring/grafana-dashboard.json),
# as written there. Left out: the `vllm_*` forms (an OpenMetrics scrape's escaping, which /metrics
# avoids), counters queried without `_total` (prometheus_client exposes them with it, as vLLM's
# own workers do) and `by (pod)` (no Kubernetes here).
VLLM_DASHBOARD = (
    *(
        f'histogram_quantile(0.99, sum by(le) (rate(vllm:{name}_bucket{{model_name="$model_name"}}[$__rate_interval])))'
        for name in (
            "e2e_request_latency_seconds",
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "time_per_output_token_seconds",
        )
    ),
    *(
        "histogram_quantile(0.95, sum by(le) "
        f'(rate(vllm:{name}_bucket{{model_name=~"$model_name"}}[$__rate_interval])))'
        for name in ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds")
    ),
    'rate(vllm:time_per_output_token_seconds_sum{model_name="$model_name"}[$__rate_interval])'
    ' / rate(vllm:time_per_output_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
    'avg(vllm:kv_cache_usage_perc{model_name=~"$model_name"})'
    ' or avg(vllm:gpu_cache_usage_perc{model_name=~"$model_name"})',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(le) (increase(vllm:iteration_tokens_total_bucket{model_name=~"$model_name"}[$__rate_interval]))',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])',
    'sum(rate(vllm:num_preemptions{model_name=~"$model_name"}[$__rate_interval]))'
    ' or sum(rate(vllm:num_preemptions_total{model_name=~"$model_name"}[$__rate_interval]))',
    'sum(rate(vllm:request_success{model_name=~"$model_name"}[$__rate_interval]))'
    ' or sum(rate(vllm:request_success_total{model_name=~"$model_name"}[$__rate_interval]))',
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    'vllm:kv_cache_usage_perc{model_name="$model_name"}',
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}[$__rate_interval]))',
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
)


def grafana(expr: str, model: str) -> str:
    """The query Grafana would send: its variables replaced (all namespaces, this model)."""
    return expr.replace("$__rate_interval", "1m").replace("$namespace", ".*").replace("$model_name", model)


class Prometheus:
    def __init__(self, work: Path, targets: dict[str, str], rules: dict[str, Any]) -> None:
        (work / "rules.yaml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": "tandem",
                    "static_configs": [
                        {"targets": [address], "labels": {"namespace": NAMESPACE, "service": f"{FULLNAME}-{service}"}}
                        for service, address in targets.items()
                    ],
                }
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        assert PROMETHEUS is not None
        self.log = open(work / "prometheus.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            cwd=work,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.work = work

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()

    def log_tail(self) -> str:
        return "".join((self.work / "prometheus.log").read_text().splitlines(keepends=True)[-30:])


@pytest.fixture
def autoscaler_port(tmp_path: Path) -> Iterator[list[int]]:
    """Filled by the test with the autoscaler's metrics port; the process is stopped by pid."""
    holder: list[Any] = []
    yield holder
    for proc in holder[1:]:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(STOP_TIMEOUT_S)


def complete(endpoint: str, model: str, i: int) -> None:
    body = json.dumps(
        {"model": model, "prompt": f"Request {i}: tell me about Tandem and its pools.", "max_tokens": 8}
    ).encode()
    request = urllib.request.Request(
        endpoint + "/v1/completions", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.status == 200


def test_prometheus_evaluates_every_dashboard_and_keda_query(
    tmp_path: Path, tiny_model_dir: Path, started: list[UpProcess], autoscaler_port: list[Any]
) -> None:
    monitoring = render_monitoring()
    (tmp_path / "up").mkdir()
    up = UpProcess.start(
        tmp_path / "up", tiny_model_dir, "--prefill", "1", "--decode", "1", "--local-prefill-max-tokens", "0"
    )
    started.append(up)
    state = up.state
    model = up.banner_value("model")
    ports = {c["name"]: c["metrics_port"] for c in state["children"] if c["metrics_port"]}
    targets = {
        "gateway": urllib.parse.urlsplit(state["endpoint"]).netloc,
        "prefill-metrics": f"127.0.0.1:{ports['prefill-0']}",
        "decode-metrics": f"127.0.0.1:{ports['decode-0']}",
    }
    with FakeKubeApi({("t", "p"): 1, ("t", "d"): 1}) as api:
        metrics_port = free_port()
        argv = [sys.executable, "-m", "tandem", "autoscaler", "--redis", state["redis_url"], "--cluster", up.cluster]
        argv += ["--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig")), "--namespace", "t"]
        argv += ["--prefill-deployment", "p", "--decode-deployment", "d", "--interval-s", "0.5"]
        argv += ["--metrics-port", str(metrics_port)]
        autoscaler = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        autoscaler_port += [metrics_port, autoscaler]
        targets["autoscaler"] = f"127.0.0.1:{metrics_port}"
        (tmp_path / "prom").mkdir()
        prometheus = Prometheus(tmp_path / "prom", targets, monitoring.rules)
        try:
            assert wait_until(prometheus.ready, 60, 0.2), prometheus.log_tail()
            assert wait_until(lambda: len(prometheus.query("up == 1")) == 4, 30, 0.5), prometheus.query("up")
            for i in range(NUM_REQUESTS):
                complete(state["endpoint"], model, i)
            # A few scrapes and rule evaluations after the last request.
            assert wait_until(lambda: bool(prometheus.query("tandem:cost_per_million_tokens")), 30, 0.5)
            time.sleep(3)
            failures = {}
            for query in monitoring.queries:
                expr = grafana(query.expr, ".*")
                labels = set(_legend_labels(query.legend))
                result = prometheus.query(expr)
                problem = _check(result, labels)
                if problem:
                    failures[f"{query.panel} {query.ref_id}: {expr}"] = problem
            for name, expr in monitoring.keda_queries.items():
                result = prometheus.query(expr)
                if [r["metric"] for r in result] != [{}] or not math.isfinite(float(result[0]["value"][1])):
                    failures[f"KEDA {name}: {expr}"] = f"expected one label-less finite sample, got {result}"
            for expr in VLLM_DASHBOARD:
                problem = _check(prometheus.query(grafana(expr, model)), set())
                if problem:
                    failures[f"vLLM dashboard: {grafana(expr, model)}"] = problem
            assert not failures, "\n".join(f"{where}: {problem}" for where, problem in sorted(failures.items()))
        finally:
            prometheus.stop()


def _legend_labels(legend: str) -> list[str]:
    return [part.split("}}")[0].strip() for part in legend.split("{{")[1:]]


def _check(result: list[dict[str, Any]], labels: set[str]) -> str | None:
    """None when `result` has series, each with `labels`, and at least one finite value."""
    if not result:
        return "no data"
    missing = [r["metric"] for r in result if not labels <= set(r["metric"])]
    if missing:
        return f"series without the labels {sorted(labels)}: {missing}"
    if not any(math.isfinite(float(r["value"][1])) for r in result):
        return f"no finite value: {result}"
    return None
