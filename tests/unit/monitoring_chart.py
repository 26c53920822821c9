"""The chart's monitoring objects as the tests read them: the Grafana dashboard, the
PrometheusRule groups and the KEDA trigger queries, rendered by the real Helm engine for
release `demo` in namespace `llm`; plus the metric names a PromQL expression reads."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "tandem"
RELEASE = "demo"
NAMESPACE = "llm"
FULLNAME = "demo-tandem"

# Words of PromQL that look like metric names but are not.
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


@dataclass(frozen=True)
class Query:
    """One dashboard target: its panel's title, its refId, its PromQL and legend."""

    panel: str
    ref_id: str
    expr: str
    legend: str


@dataclass(frozen=True)
class Monitoring:
    dashboard: dict[str, Any]
    rules: dict[str, Any]  # the PrometheusRule's spec: {"groups": [...]}
    keda_queries: dict[str, str]  # "<ScaledObject name>/<trigger index>" -> query

    @property
    def queries(self) -> list[Query]:
        return [
            Query(panel["title"], target["refId"], target["expr"], target["legendFormat"])
            for panel in self.dashboard["panels"]
            for target in panel["targets"]
        ]

    @property
    def recorded_names(self) -> set[str]:
        return {rule["record"] for group in self.rules["groups"] for rule in group["rules"] if "record" in rule}


def render_monitoring(values: dict[str, Any] | None = None) -> Monitoring:
    """Render with the dashboard, rules and KEDA on (plus `values`)."""
    merged = {"monitoring": {"rules": {"enabled": True}}, "keda": {"enabled": True}, **(values or {})}
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(merged, name=RELEASE, namespace=NAMESPACE)
    manifests = [text for path, text in rendered.items() if path.endswith(".yaml") and text.strip()]
    objects = [doc for text in manifests for doc in yaml.safe_load_all(text) if doc]
    (config_map,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{FULLNAME}-dashboard"
    ]
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    keda = {
        f"{o['metadata']['name']}/{i}": trigger["metadata"]["query"]
        for o in objects
        if o["kind"] == "ScaledObject"
        for i, trigger in enumerate(o["spec"]["triggers"])
    }
    return Monitoring(json.loads(config_map["data"]["tandem.json"]), rule["spec"], keda)


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: string literals, label matchers, grouping clauses and
    range durations removed, then every name not called as a function and not a keyword."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _NAME.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _KEYWORDS:
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the exponent of 1e6
        names.add(match.group())
    return names
