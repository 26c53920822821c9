"""The chart's PrometheusRule, checked by Debian's promtool (`apt-get install prometheus`; .ci/run
installs it): `promtool check rules` on the rendered groups, and `promtool test rules` with a
case per alert that fires and one that does not, plus the cost recording rule's exact value.

The rules are rendered by the real Helm engine (helm-python-sdk) for release `demo` in namespace
`llm`, so every input series carries the labels a ServiceMonitor scrape adds (namespace,
service). Skipped, saying why, where promtool is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "tandem"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run does it)"
)

# Every rule threshold at its default, and the cost: 2.0 $/GPU hour for prefill, 2.5 for decode.
VALUES = {"monitoring": {"rules": {"enabled": True}, "gpuHourCost": {"prefill": 2.0, "decode": 2.5}}}
# 1 prefill + 2 decode workers (1 GPU each): 7 $/h; 100 generated and 300 prompt tokens a second.
# Expected values in Prometheus's order of float operations (left to right).
DOLLARS_PER_HOUR = 1 * 2.0 + 2 * 2.5
PER_MILLION_OUTPUT = DOLLARS_PER_HOUR * 1e6 / 3600 / 100
PER_MILLION_TOTAL = DOLLARS_PER_HOUR * 1e6 / 3600 / (300 + 100)
GATEWAY = 'namespace="llm",service="demo-tandem-gateway",model_name="m"'
AUTOSCALER = 'namespace="llm",service="demo-tandem-autoscaler"'


def worker(worker_id: str) -> str:
    role = "prefill" if worker_id.startswith("p") else "decode"
    return f'namespace="llm",service="demo-tandem-{role}-metrics",worker_id="{worker_id}",role="{role}"'


def render_rules(values: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name="demo", namespace="llm")
    (text,) = [body for path, body in rendered.items() if path.endswith("templates/prometheusrule.yaml")]
    rule = yaml.safe_load(text)
    assert rule["kind"] == "PrometheusRule" and rule["metadata"]["name"] == "demo-tandem-rules"
    spec: dict[str, Any] = rule["spec"]
    return spec


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump(render_rules(VALUES)))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules_accepts_the_rendered_rules(rules_file: Path) -> None:
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"Checking {rules_file}\n  SUCCESS: 16 rules found\n\n"
    assert result.stderr == ""


def test_the_rules_are_off_by_default() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render({}, name="demo", namespace="llm")
    assert not [path for path, body in rendered.items() if path.endswith("prometheusrule.yaml") and body.strip()]


def test_every_alert_has_a_case(rules_file: Path) -> None:
    alerts = {r["alert"] for g in yaml.safe_load(rules_file.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tested = {case["alertname"] for group in CASES for case in group.get("alert_rule_test", [])}
    assert (
        alerts
        == tested
        == {
            "TandemKVCacheAlmostFull",
            "TandemQueueWaitOverSLO",
            "TandemHighErrorRate",
            "TandemTTFTSLOBurn",
            "TandemKVTransferFailures",
            "TandemWorkerHeartbeatMissing",
            "TandemAutoscalerAtMaxWithQueue",
        }
    )


def alert(labels: dict[str, str], summary: str, description: str) -> dict[str, Any]:
    return {"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}}


KV_DESCRIPTION = "Sequences will be preempted and new ones queued; add workers to the pool or lower max concurrency."
QUEUE_DESCRIPTION = "Requests wait in the workers' queues longer than the SLO; the pool needs more replicas."
ERROR_DESCRIPTION = "The gateway answers server errors: check worker health, Redis and admission refusals."
TRANSFER_DESCRIPTION = (
    "Decode workers recompute the prompts instead (tandem_kv_recomputes_total): check the network between the pools."
)
HEARTBEAT_DESCRIPTION = "A worker's heartbeat is missing: it gets no traffic. Check its Redis connection and logs."


def queue_buckets(worker_id: str, per_minute: dict[str, int]) -> list[dict[str, str]]:
    """Cumulative le buckets of vllm:request_queue_time_seconds growing by `per_minute`."""
    return [
        {"series": f'vllm:request_queue_time_seconds_bucket{{{worker(worker_id)},le="{le}"}}', "values": f"0+{n}x20"}
        for le, n in per_minute.items()
    ]


def ttft_series(fast_per_minute: int) -> list[dict[str, str]]:
    """Gateway TTFT: 10 requests a minute, `fast_per_minute` of them within 2.5 s."""
    return [
        {
            "series": f'tandem_time_to_first_token_seconds_bucket{{{GATEWAY},le="2.5"}}',
            "values": f"0+{fast_per_minute}x400",
        },
        {"series": f"tandem_time_to_first_token_seconds_count{{{GATEWAY}}}", "values": "0+10x400"},
    ]


CASES: list[dict[str, Any]] = [
    {  # KV cache above 0.9 for 5 minutes: d-0 fires (pending before), d-1 at 0.5 does not.
        "interval": "1m",
        "input_series": [
            {"series": f"vllm:kv_cache_usage_perc{{{worker('d-0')}}}", "values": "0.95x10"},
            {"series": f"vllm:kv_cache_usage_perc{{{worker('d-1')}}}", "values": "0.5x10"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "TandemKVCacheAlmostFull", "exp_alerts": []},
            {
                "eval_time": "6m",
                "alertname": "TandemKVCacheAlmostFull",
                "exp_alerts": [
                    alert(
                        {"severity": "warning", "namespace": "llm", "role": "decode", "worker_id": "d-0"},
                        "KV cache of d-0 (decode) above 0.9 for 5m",
                        KV_DESCRIPTION,
                    )
                ],
            },
        ],
    },
    {  # Queue wait p99: the decode pool's waits are 1 to 2.5 s (over the 1 s SLO), prefill's < 0.5 s.
        "interval": "1m",
        "input_series": [
            *queue_buckets("d-0", {"0.5": 0, "1.0": 0, "2.5": 10, "+Inf": 10}),
            *queue_buckets("p-0", {"0.5": 10, "1.0": 10, "2.5": 10, "+Inf": 10}),
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "TandemQueueWaitOverSLO",
                "exp_alerts": [
                    alert(
                        {"severity": "warning", "namespace": "llm", "role": "decode"},
                        "p99 queue wait of the decode pool is 2.485s (SLO 1 s)",
                        QUEUE_DESCRIPTION,
                    )
                ],
            }
        ],
    },
    {  # 10% of requests 5xx: over the 5% threshold.
        "interval": "1m",
        "input_series": [
            {
                "series": f'tandem_requests_total{{{GATEWAY},endpoint="/v1/completions",status="200"}}',
                "values": "0+90x20",
            },
            {
                "series": f'tandem_requests_total{{{GATEWAY},endpoint="/v1/completions",status="503"}}',
                "values": "0+10x20",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "TandemHighErrorRate",
                "exp_alerts": [
                    alert(
                        {"severity": "critical", "namespace": "llm"},
                        "10% of requests answered 5xx (threshold 0.05)",
                        ERROR_DESCRIPTION,
                    )
                ],
            }
        ],
    },
    {  # 1% of requests 5xx: under the threshold.
        "interval": "1m",
        "input_series": [
            {
                "series": f'tandem_requests_total{{{GATEWAY},endpoint="/v1/completions",status="200"}}',
                "values": "0+99x20",
            },
            {
                "series": f'tandem_requests_total{{{GATEWAY},endpoint="/v1/completions",status="503"}}',
                "values": "0+1x20",
            },
        ],
        "alert_rule_test": [{"eval_time": "10m", "alertname": "TandemHighErrorRate", "exp_alerts": []}],
    },
    {  # Every request misses the TTFT objective: both burn windows fire.
        "interval": "1m",
        "input_series": ttft_series(fast_per_minute=0),
        "alert_rule_test": [
            {
                "eval_time": "65m",
                "alertname": "TandemTTFTSLOBurn",
                "exp_alerts": [
                    alert(
                        {"severity": "critical", "namespace": "llm"},
                        "TTFT SLO (0.99 within 2.5 s) burning its error budget 14.4x fast",
                        "At this rate a 30-day error budget is gone in about 2 days.",
                    ),
                    alert(
                        {"severity": "warning", "namespace": "llm"},
                        "TTFT SLO (0.99 within 2.5 s) burning its error budget 6x fast",
                        "At this rate a 30-day error budget is gone in about 5 days.",
                    ),
                ],
            }
        ],
    },
    {  # 99.5% of requests within the objective (1 slow in 200): under both burn rates.
        "interval": "1m",
        "input_series": [
            {"series": f'tandem_time_to_first_token_seconds_bucket{{{GATEWAY},le="2.5"}}', "values": "0+199x400"},
            {"series": f"tandem_time_to_first_token_seconds_count{{{GATEWAY}}}", "values": "0+200x400"},
        ],
        "alert_rule_test": [{"eval_time": "65m", "alertname": "TandemTTFTSLOBurn", "exp_alerts": []}],
    },
    {  # One failed pull a minute on the decode pool; the prefill pool's count does not move.
        "interval": "1m",
        "input_series": [
            {"series": f'tandem_kv_transfer_failures_total{{{worker("d-0")},reason="timeout"}}', "values": "0+1x10"},
            {"series": f'tandem_kv_transfer_failures_total{{{worker("p-0")},reason="timeout"}}', "values": "3x10"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "8m",
                "alertname": "TandemKVTransferFailures",
                "exp_alerts": [
                    alert(
                        {"severity": "warning", "namespace": "llm", "role": "decode"},
                        "5 KV transfers failed in 5 minutes on the decode pool",
                        TRANSFER_DESCRIPTION,
                    )
                ],
            }
        ],
    },
    {  # Two decode workers scraped, one live in Redis; the prefill pool matches.
        "interval": "1m",
        "input_series": [
            {"series": f"vllm:num_requests_running{{{worker('d-0')}}}", "values": "0x10"},
            {"series": f"vllm:num_requests_running{{{worker('d-1')}}}", "values": "0x10"},
            {"series": f"vllm:num_requests_running{{{worker('p-0')}}}", "values": "0x10"},
            {"series": f'tandem_workers{{{GATEWAY},pool="decode"}}', "values": "1x10"},
            {"series": f'tandem_workers{{{GATEWAY},pool="prefill"}}', "values": "1x10"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "TandemWorkerHeartbeatMissing",
                "exp_alerts": [
                    alert(
                        {"severity": "warning", "namespace": "llm", "role": "decode"},
                        "2 decode workers are scraped but fewer are live in Redis",
                        HEARTBEAT_DESCRIPTION,
                    )
                ],
            }
        ],
    },
    {  # Both pools at their max of 4; only the decode pool has a queue.
        "interval": "1m",
        "input_series": [
            {"series": f'tandem_autoscaler_current_replicas{{{AUTOSCALER},pool="decode"}}', "values": "4x10"},
            {"series": f'tandem_autoscaler_waiting_requests{{{AUTOSCALER},pool="decode"}}', "values": "3x10"},
            {"series": f'tandem_autoscaler_queued_prefill_tokens{{{AUTOSCALER},pool="decode"}}', "values": "0x10"},
            {"series": f'tandem_autoscaler_current_replicas{{{AUTOSCALER},pool="prefill"}}', "values": "4x10"},
            {"series": f'tandem_autoscaler_waiting_requests{{{AUTOSCALER},pool="prefill"}}', "values": "0x10"},
            {"series": f'tandem_autoscaler_queued_prefill_tokens{{{AUTOSCALER},pool="prefill"}}', "values": "0x10"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "7m",
                "alertname": "TandemAutoscalerAtMaxWithQueue",
                "exp_alerts": [
                    alert(
                        {"severity": "warning", "namespace": "llm", "pool": "decode"},
                        "The decode pool is at its 4 max replicas and still has a queue",
                        "Raise autoscaler.decode.maxReplicas or add capacity.",
                    )
                ],
            }
        ],
    },
    {  # Below max with a queue: no alert.
        "interval": "1m",
        "input_series": [
            {"series": f'tandem_autoscaler_current_replicas{{{AUTOSCALER},pool="decode"}}', "values": "3x10"},
            {"series": f'tandem_autoscaler_waiting_requests{{{AUTOSCALER},pool="decode"}}', "values": "3x10"},
            {"series": f'tandem_autoscaler_queued_prefill_tokens{{{AUTOSCALER},pool="decode"}}', "values": "0x10"},
        ],
        "alert_rule_test": [{"eval_time": "7m", "alertname": "TandemAutoscalerAtMaxWithQueue", "exp_alerts": []}],
    },
    {  # Cost: 7 $/h; about 19.44 $ per million output tokens, 4.86 $ per million tokens.
        "interval": "1m",
        "input_series": [
            {"series": f'tandem_workers{{{GATEWAY},pool="prefill"}}', "values": "1x10"},
            {"series": f'tandem_workers{{{GATEWAY},pool="decode"}}', "values": "2x10"},
            {"series": f"tandem_generation_tokens_total{{{GATEWAY}}}", "values": "0+6000x10"},
            {"series": f"tandem_prompt_tokens_total{{{GATEWAY}}}", "values": "0+18000x10"},
        ],
        "promql_expr_test": [
            {
                "expr": "tandem:gpu_cost_dollars_per_hour",
                "eval_time": "6m",
                "exp_samples": [
                    {"labels": 'tandem:gpu_cost_dollars_per_hour{namespace="llm"}', "value": DOLLARS_PER_HOUR}
                ],
            },
            {
                "expr": "tandem:cost_per_million_tokens",
                "eval_time": "6m",
                "exp_samples": [
                    {
                        "labels": 'tandem:cost_per_million_tokens{namespace="llm",tokens="output"}',
                        "value": PER_MILLION_OUTPUT,
                    },
                    {
                        "labels": 'tandem:cost_per_million_tokens{namespace="llm",tokens="total"}',
                        "value": PER_MILLION_TOTAL,
                    },
                ],
            },
        ],
    },
]


def test_promtool_unit_tests_of_every_alert_pass(rules_file: Path) -> None:
    tests = rules_file.parent / "rules_test.yaml"
    tests.write_text(
        yaml.safe_dump({"rule_files": [rules_file.name], "evaluation_interval": "1m", "tests": CASES}, sort_keys=False)
    )
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"Unit Testing:  {tests}\n  SUCCESS\n\n"
