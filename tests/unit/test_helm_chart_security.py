"""The chart's locked-down internal plane (issue 16): Secrets and NetworkPolicies, checked offline.

Rendered by the real Helm engine, as in test_helm_chart.py (whose render helpers and
scenarios this module shares). Three properties, over every scenario and the deploy/ examples:

- The cluster token and the Redis password come from Secrets: every Tandem container reads
  TANDEM_CLUSTER_TOKEN (and the Redis password) through secretKeyRef, no generated secret
  value appears in any object but its Secret, and an existing Secret replaces the chart's own.
- The Redis URL the binaries get carries the password through the kubelet's $(VAR) expansion,
  and redis-py (what the binaries use) reads the expanded URL as intended.
- Every port a container declares is covered by the NetworkPolicies: internal ports (worker
  gRPC with KV transfer, Redis) only from this release's pods, metrics ports only from
  networkPolicy.metrics.from, the gateway's port from networkPolicy.gateway.from. The
  policies are evaluated as Kubernetes does (selected pods, union of rules, label selectors).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from redis.connection import parse_url

from tests.unit.test_helm_chart import (  # noqa: F401 - `chart` is a fixture
    FULLNAME,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    Manifest,
    chart,
    container,
    find,
    flag,
    one,
    render,
)

TANDEM_COMPONENTS = ("gateway", "prefill", "decode", "autoscaler")
TOKEN_REF = {"secretKeyRef": {"name": f"{FULLNAME}-auth", "key": "token"}}
REDIS_PASSWORD_REF = {"secretKeyRef": {"name": f"{FULLNAME}-redis", "key": "redis-password"}}
ALPHANUMERIC = re.compile(r"[A-Za-z0-9]{48}")


def _env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def _tandem_containers(objects: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Component -> its container, for every Tandem Deployment rendered."""
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]["template"]["spec"]["containers"][0]
        for o in find(objects, "Deployment")
    }


def _generated(objects: list[Manifest]) -> dict[str, dict[str, str]]:
    """Secret name -> key -> decoded value, for the Secrets the chart renders."""
    return {
        s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
        for s in find(objects, "Secret")
    }


# --- the Secrets ------------------------------------------------------------------------------


def test_generated_token_and_redis_password_are_random_48_alphanumerics(chart: Any) -> None:
    first, second = _generated(render(chart)), _generated(render(chart))
    assert set(first) == {f"{FULLNAME}-auth", f"{FULLNAME}-redis"}
    assert set(first[f"{FULLNAME}-auth"]) == {"token"}
    assert set(first[f"{FULLNAME}-redis"]) == {"redis-password"}
    values = [first[f"{FULLNAME}-auth"]["token"], first[f"{FULLNAME}-redis"]["redis-password"]]
    assert all(ALPHANUMERIC.fullmatch(v) for v in values), values
    assert values[0] != values[1]
    # Offline, `lookup` finds no Secret to keep: each render makes new values (the documented
    # reason to use auth.existingSecret with `helm template`-based tools).
    assert second[f"{FULLNAME}-auth"]["token"] != values[0]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_tandem_container_reads_the_token_from_the_secret(chart: Any, scenario: str) -> None:
    objects = render(chart, SCENARIOS[scenario])
    existing = SCENARIOS[scenario].get("auth", {}).get("existingSecret")
    ref = {"secretKeyRef": {"name": existing, "key": "token"}} if existing else TOKEN_REF
    containers = _tandem_containers(objects)
    assert {"gateway", "prefill", "decode"} <= set(containers) <= set(TANDEM_COMPONENTS)
    for component, c in containers.items():
        assert _env(c)["TANDEM_CLUSTER_TOKEN"] == {"name": "TANDEM_CLUSTER_TOKEN", "valueFrom": ref}, component
    # the worker's preStop `tandem drain` is an exec hook: it runs with that same env
    for role in ("prefill", "decode"):
        assert containers[role]["lifecycle"]["preStop"]["exec"]["command"][:2] == ["/bin/sh", "-c"]
    # the Secret it names is the chart's exactly when no existing one is named
    assert (f"{FULLNAME}-auth" in _generated(objects)) is not bool(existing)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_secret_value_outside_its_secret_and_no_literal_secret_in_env(chart: Any, scenario: str) -> None:
    objects = render(chart, SCENARIOS[scenario])
    secrets = [v for keys in _generated(objects).values() for v in keys.values()]
    assert len(secrets) == len(find(objects, "Secret"))
    others = json.dumps([o for o in objects if o["kind"] != "Secret"])
    for value in secrets:
        assert value not in others
        assert base64.b64encode(value.encode()).decode() not in others
    for workload in find(objects, "Deployment") + find(objects, "StatefulSet"):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            for entry in c.get("env", []):
                if re.search(r"TOKEN|PASSWORD|AUTH|KEYS|SECRET|REDIS_URL", entry["name"]):
                    assert set(entry) == {"name", "valueFrom"}, entry
                    assert set(entry["valueFrom"]) == {"secretKeyRef"}, entry


def test_existing_secrets_replace_the_generated_ones(chart: Any) -> None:
    values = {
        "auth": {"existingSecret": "cluster-token", "existingSecretKey": "t"},
        "redis": {"auth": {"existingSecret": "redis-pw", "existingSecretKey": "pw"}},
        "autoscaler": {"enabled": True},
    }
    objects = render(chart, values)
    assert not find(objects, "Secret")
    token = {"secretKeyRef": {"name": "cluster-token", "key": "t"}}
    password = {"secretKeyRef": {"name": "redis-pw", "key": "pw"}}
    containers = _tandem_containers(objects)
    assert set(containers) == set(TANDEM_COMPONENTS)
    for c in containers.values():
        assert _env(c)["TANDEM_CLUSTER_TOKEN"]["valueFrom"] == token
        assert _env(c)["TANDEM_REDIS_PASSWORD"]["valueFrom"] == password
    redis_env = _env(container(objects, "redis"))
    assert redis_env["REDIS_PASSWORD"]["valueFrom"] == password
    assert redis_env["REDISCLI_AUTH"]["valueFrom"] == password
    # one of the two alone: only the other Secret is generated
    only_token = render(chart, {"auth": {"existingSecret": "cluster-token"}})
    assert [s["metadata"]["name"] for s in find(only_token, "Secret")] == [f"{FULLNAME}-redis"]
    assert _env(container(only_token, "gateway"))["TANDEM_CLUSTER_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "cluster-token", "key": "token"}
    }


# --- Redis ------------------------------------------------------------------------------------


def test_embedded_redis_requires_the_password_and_every_component_presents_it(chart: Any) -> None:
    objects = render(chart, {"autoscaler": {"enabled": True}})
    password = _generated(objects)[f"{FULLNAME}-redis"]["redis-password"]
    server = container(objects, "redis")
    assert flag(server["args"], "--requirepass") == "$(REDIS_PASSWORD)"
    assert "--protected-mode" not in server["args"]
    assert _env(server)["REDIS_PASSWORD"]["valueFrom"] == REDIS_PASSWORD_REF
    assert _env(server)["REDISCLI_AUTH"]["valueFrom"] == REDIS_PASSWORD_REF
    assert server["readinessProbe"]["exec"]["command"] == ["/bin/sh", "-c", 'test "$(redis-cli ping)" = PONG']
    containers = _tandem_containers(objects)
    assert set(containers) == set(TANDEM_COMPONENTS)
    for c in containers.values():
        assert _env(c)["TANDEM_REDIS_PASSWORD"]["valueFrom"] == REDIS_PASSWORD_REF
        url = _expand(flag(c["args"], "--redis"), {"TANDEM_REDIS_PASSWORD": password})
        assert parse_url(url) == {
            "password": password,
            "host": f"{FULLNAME}-redis.{NAMESPACE}.svc",
            "port": 6379,
            "db": 0,
        }


@pytest.mark.parametrize(
    ("url", "expanded", "parsed"),
    [
        (
            "redis://redis.shared.svc:6379/2",
            "redis://:pw@redis.shared.svc:6379/2",
            {"password": "pw", "host": "redis.shared.svc", "port": 6379, "db": 2},
        ),
        (
            "rediss://redis.shared.svc:6380/1",
            "rediss://:pw@redis.shared.svc:6380/1",
            {
                "password": "pw",
                "host": "redis.shared.svc",
                "port": 6380,
                "db": 1,
                "connection_class": redis.SSLConnection,
            },
        ),
    ],
)
def test_external_redis_gets_the_password_from_an_existing_secret(
    chart: Any, url: str, expanded: str, parsed: dict[str, Any]
) -> None:
    values = {"redis": {"enabled": False, "externalUrl": url, "auth": {"existingSecret": "ext"}}}
    objects = render(chart, {**values, "autoscaler": {"enabled": True}})
    assert [s["metadata"]["name"] for s in find(objects, "Secret")] == [f"{FULLNAME}-auth"]
    containers = _tandem_containers(objects)
    assert set(containers) == set(TANDEM_COMPONENTS)
    for c in containers.values():
        assert _env(c)["TANDEM_REDIS_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "ext", "key": "redis-password"}
        }
        url_arg = flag(c["args"], "--redis")
        assert _expand(url_arg, {"TANDEM_REDIS_PASSWORD": "pw"}) == expanded
        assert parse_url(expanded) == parsed


def test_external_redis_without_a_password_and_from_a_url_secret(chart: Any) -> None:
    plain = render(chart, {"redis": {"enabled": False, "externalUrl": "rediss://r.example:6380/0"}})
    for c in _tandem_containers(plain).values():
        assert flag(c["args"], "--redis") == "rediss://r.example:6380/0"
        assert "TANDEM_REDIS_PASSWORD" not in _env(c) and "TANDEM_REDIS_URL" not in _env(c)
    from_secret = render(
        chart,
        {
            "redis": {"enabled": False, "externalUrlSecret": {"name": "redis-url", "key": "url"}},
            "keda": {"enabled": True},
        },
    )
    containers = _tandem_containers(from_secret)
    assert set(containers) == {"gateway", "prefill", "decode"}
    for c in containers.values():
        assert flag(c["args"], "--redis") == "$(TANDEM_REDIS_URL)"
        assert _env(c)["TANDEM_REDIS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "redis-url", "key": "url"}}
        assert "TANDEM_REDIS_PASSWORD" not in _env(c)
    assert [s["metadata"]["name"] for s in find(from_secret, "Secret")] == [f"{FULLNAME}-auth"]


# --- NetworkPolicy coverage -------------------------------------------------------------------

RELEASE_LABELS = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": RELEASE}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


@dataclass
class Sources:
    """Who may open a connection to one (component, port): this release's components, peers
    outside it (as written in the policy), or anyone."""

    components: set[str] = field(default_factory=set)
    outside: list[dict[str, Any]] = field(default_factory=list)
    anyone: bool = False


def _pods(objects: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Component -> the pod template of its workload."""
    return {
        o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]["template"]
        for o in find(objects, "Deployment") + find(objects, "StatefulSet")
    }


def _declared_ports(objects: list[Manifest]) -> set[tuple[str, int]]:
    """(component, port) of every containerPort and every Service's target port."""
    pods = _pods(objects)
    declared = {
        (comp, p["containerPort"])
        for comp, pod in pods.items()
        for c in pod["spec"]["containers"]
        for p in c.get("ports", [])
    }
    for service in find(objects, "Service"):
        targets = [
            comp
            for comp, pod in pods.items()
            if _matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        named = {p["name"]: p["containerPort"] for c in pods[targets[0]]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            declared.add((targets[0], named[target] if isinstance(target, str) else target))
    return declared


def _ingress(objects: list[Manifest]) -> dict[tuple[str, int], Sources]:
    """For every declared (component, port), who the NetworkPolicies let in."""
    pods = _pods(objects)
    # Pods of the same namespace that are not this release's: another release, a bare pod.
    foreign = [
        {**RELEASE_LABELS, "app.kubernetes.io/instance": "other", "app.kubernetes.io/component": c} for c in pods
    ]
    foreign += [{"app.kubernetes.io/component": c} for c in pods]
    policies = [p["spec"] for p in find(objects, "NetworkPolicy")]
    result: dict[tuple[str, int], Sources] = {}
    for comp, port in _declared_ports(objects):
        labels = pods[comp]["metadata"]["labels"]
        selecting = [p for p in policies if "Ingress" in p["policyTypes"] and _matches(p["podSelector"], labels)]
        sources = Sources(anyone=not selecting)  # a pod no policy selects is open
        for policy in selecting:
            for rule in policy.get("ingress", []):
                if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                    continue
                if not rule.get("from"):
                    sources.anyone = True
                for peer in rule.get("from", []):
                    only_pods = set(peer) == {"podSelector"}
                    if only_pods and not any(_matches(peer["podSelector"], f) for f in foreign):
                        sources.components |= {
                            c for c, pod in pods.items() if _matches(peer["podSelector"], pod["metadata"]["labels"])
                        }
                    else:
                        sources.outside.append(peer)
        result[(comp, port)] = sources
    return result


def _values(scenario: str, *path: str) -> Any:
    """A value of the scenario, else the chart's default."""
    defaults = {
        ("gateway", "port"): 8000,
        ("worker", "grpcPort"): 50051,
        ("worker", "metricsPort"): 9100,
        ("worker", "kvTransport"): "grpc",
        ("worker", "kvTcpPort"): 50052,
        ("autoscaler", "metricsPort"): 9400,
        ("networkPolicy", "gateway", "from"): [],
        ("networkPolicy", "metrics", "from"): [
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
        ],
    }
    node: Any = SCENARIOS[scenario]
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return defaults[path]
        node = node[key]
    return node


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_internal_port_is_open_only_to_the_release_s_pods(chart: Any, scenario: str) -> None:
    objects = render(chart, SCENARIOS[scenario])
    ingress = _ingress(objects)
    components = set(_pods(objects))
    grpc, worker_metrics = _values(scenario, "worker", "grpcPort"), _values(scenario, "worker", "metricsPort")
    public = {("gateway", _values(scenario, "gateway", "port"))}
    metrics = {(role, worker_metrics) for role in ("prefill", "decode")}
    if "autoscaler" in components:
        metrics.add(("autoscaler", _values(scenario, "autoscaler", "metricsPort")))
    internal = {(role, grpc) for role in ("prefill", "decode")}
    if "redis" in components:
        internal.add(("redis", 6379))
    if _values(scenario, "worker", "kvTransport") == "tcp":
        internal |= {(role, _values(scenario, "worker", "kvTcpPort")) for role in ("prefill", "decode")}
    # every port a container or a Service declares is one of these, exactly
    assert set(ingress) == public | internal | metrics

    restricted = {key for key, s in ingress.items() if s.components and not s.outside and not s.anyone}
    assert restricted == internal
    assert ingress[("prefill", grpc)].components == {"gateway", "prefill", "decode"}
    assert ingress[("decode", grpc)].components == {"gateway", "prefill", "decode"}
    if "redis" in components:
        assert ingress[("redis", 6379)].components == components  # every Tandem pod reaches Redis
    for role, port in internal - {("redis", 6379)} - {(r, grpc) for r in ("prefill", "decode")}:
        assert ingress[(role, port)].components == {"prefill", "decode"}  # the tcp KV data port

    metrics_from = _values(scenario, "networkPolicy", "metrics", "from")
    for key in metrics:
        assert ingress[key].outside == metrics_from and ingress[key].anyone is (metrics_from == [])
        assert ingress[key].components <= {"prefill", "decode"}  # at most the torch worker mesh
    gateway_from = _values(scenario, "networkPolicy", "gateway", "from")
    (gateway,) = public
    assert ingress[gateway].outside == gateway_from and ingress[gateway].anyone is (gateway_from == [])


@pytest.mark.parametrize(("values", "mesh"), [({}, False), ({"worker": {"kvTransport": "torch"}}, True)])
def test_the_torch_transport_opens_every_port_between_workers_only(
    chart: Any, values: dict[str, Any], mesh: bool
) -> None:
    workers = one(render(chart, values), "NetworkPolicy", f"{FULLNAME}-workers")["spec"]["ingress"]
    mesh_rules = [rule for rule in workers if "ports" not in rule]
    between_workers = {
        "podSelector": {
            "matchLabels": RELEASE_LABELS,
            "matchExpressions": [
                {"key": "app.kubernetes.io/component", "operator": "In", "values": ["prefill", "decode"]}
            ],
        }
    }
    assert mesh_rules == ([{"from": [between_workers]}] if mesh else [])


def test_the_tcp_transport_opens_its_data_port_between_workers_only(chart: Any) -> None:
    objects = render(chart, {"worker": {"kvTransport": "tcp", "kvTcpPort": 50060}})
    workers = one(objects, "NetworkPolicy", f"{FULLNAME}-workers")["spec"]["ingress"]
    between_workers = {
        "podSelector": {
            "matchLabels": RELEASE_LABELS,
            "matchExpressions": [
                {"key": "app.kubernetes.io/component", "operator": "In", "values": ["prefill", "decode"]}
            ],
        }
    }
    tcp_rules = [rule for rule in workers if rule.get("ports") == [{"protocol": "TCP", "port": 50060}]]
    assert tcp_rules == [{"from": [between_workers], "ports": [{"protocol": "TCP", "port": 50060}]}]
    assert not [rule for rule in workers if "ports" not in rule]  # no open mesh
    for role in ("prefill", "decode"):
        (pod,) = [
            o["spec"]["template"]["spec"]
            for o in objects
            if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{FULLNAME}-{role}"
        ]
        args, ports = pod["containers"][0]["args"], pod["containers"][0]["ports"]
        assert args[args.index("--kv-tcp-port") + 1] == "50060"
        assert {"name": "kv-tcp", "containerPort": 50060, "protocol": "TCP"} in ports
    default = one(render(chart), "NetworkPolicy", f"{FULLNAME}-workers")["spec"]["ingress"]
    assert not [rule for rule in default if rule.get("ports") == [{"protocol": "TCP", "port": 50052}]]


def test_no_network_policy_when_disabled_and_every_pod_is_then_open(chart: Any) -> None:
    ingress = _ingress(render(chart, {"networkPolicy": {"enabled": False}}))
    assert ingress and all(s.anyone for s in ingress.values())
