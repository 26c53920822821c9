"""The Helm chart (helm/tandem) and the image (deploy/Dockerfile), checked offline.

The chart is linted and rendered by the real Helm v4 engine (helm-python-sdk, no `helm`
binary), and every rendered object is validated against the Kubernetes 1.33 OpenAPI schemas in
strict mode (kubernetes-validate: unknown fields are errors). kubernetes-validate has no
schemas for CRDs: its Python API raises SchemaNotFoundError for them (its CLI only warns and
exits 0), so the CRD kinds the chart renders, KEDA's ScaledObject and the Prometheus
Operator's ServiceMonitor and PrometheusRule, are accepted only by that exception and their fields are asserted
by the tests below instead.

Golden file: tests/unit/golden/helm_default.yaml pins the default render. After an intended
chart change, regenerate it and review the diff:

    TANDEM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_helm_chart.py
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm  # dev dependency: the Helm v4 engine, no binary
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "tandem"
DEPLOY_DIR = ROOT / "deploy"
GOLDEN = Path(__file__).resolve().parent / "golden" / "helm_default.yaml"

RELEASE = "demo"
NAMESPACE = "llm"
FULLNAME = "demo-tandem"  # release name + chart name
KUBERNETES_VERSION = "1.33"
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
EXTERNAL_REDIS = "redis://redis.shared.svc:6379/2"
# The embedded Redis's URL as every Tandem container gets it: the kubelet expands the password.
EMBEDDED_REDIS = f"redis://:$(TANDEM_REDIS_PASSWORD)@{FULLNAME}-redis.{NAMESPACE}.svc:6379/0"
# Keys of the Secrets the chart generates (random at each offline render: the golden masks them).
GENERATED_KEYS = ("token", "redis-password")

Manifest = dict[str, Any]


def _example(name: str) -> dict[str, Any]:
    return helm.values_from_yaml((DEPLOY_DIR / name).read_text())


SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "keda": {"keda": {"enabled": True}},
    "external-redis": {"redis": {"enabled": False, "externalUrl": EXTERNAL_REDIS}, "autoscaler": {"enabled": True}},
    "everything-on": {
        "autoscaler": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "monitoring": {"rules": {"enabled": True}},
        "redis": {"persistence": {"enabled": True, "storageClassName": "fast"}},
        "networkPolicy": {"workerMeshAllPorts": True, "gateway": {"from": [{"namespaceSelector": {}}]}},
        "gateway": {"apiKeysSecret": {"name": "keys"}, "service": {"type": "LoadBalancer"}},
        "imagePullSecrets": [{"name": "registry"}],
        "worker": {"kvTransport": "torch"},
    },
    "existing-secrets": {
        "auth": {"existingSecret": "cluster-token", "existingSecretKey": "token"},
        "redis": {"auth": {"existingSecret": "redis-pw", "existingSecretKey": "password"}},
        "autoscaler": {"enabled": True},
    },
    "external-redis-url-secret": {
        "redis": {"enabled": False, "externalUrlSecret": {"name": "redis-url", "key": "url"}},
        "worker": {"kvTransport": "torch"},
    },
    "tcp-transport": {"worker": {"kvTransport": "tcp", "kvTcpPort": 50060}},
    "multi-node": _example("values-multi-node.yaml"),
    "single-node": _example("values-single-node.yaml"),
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def _render_sources(chart: Any, values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered YAML, manifests only (NOTES.txt and empty files dropped)."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return {path: text for path, text in sorted(rendered.items()) if path.endswith(".yaml") and text.strip()}


def render(chart: Any, values: dict[str, Any] | None = None) -> list[Manifest]:
    objects = []
    for text in _render_sources(chart, values or {}).values():
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def find(objects: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(objects: list[Manifest], component: str) -> dict[str, Any]:
    workload = [
        o
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] == f"{FULLNAME}-{component}"
    ]
    assert len(workload) == 1, f"no workload for {component}"
    (only,) = workload[0]["spec"]["template"]["spec"]["containers"]
    return only


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


# --- lint, strict schema validation, golden ---------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_is_clean(scenario: str) -> None:
    report = helm.lint(CHART_DIR, SCENARIOS[scenario], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_validates_strictly_against_kubernetes_1_33(chart: Any, scenario: str) -> None:
    objects = render(chart, SCENARIOS[scenario])
    assert objects
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        assert obj["metadata"]["namespace"] == NAMESPACE, where


def _mask_generated_secrets(text: str) -> str:
    """The generated Secret values, random in an offline render (`lookup` finds no Secret)."""
    keys = "|".join(GENERATED_KEYS)
    masked, count = re.subn(rf"^(  (?:{keys}): )[A-Za-z0-9+/=]+$", r"\1<generated>", text, flags=re.M)
    assert count == len(GENERATED_KEYS), text
    return masked


def test_default_render_matches_golden(chart: Any) -> None:
    sources = _render_sources(chart, {})
    text = "".join(f"# Source: {path}\n{body.strip()}\n---\n" for path, body in sources.items())
    text = _mask_generated_secrets(text)
    if os.environ.get("TANDEM_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert GOLDEN.exists(), "no golden file: run with TANDEM_UPDATE_GOLDEN=1"
    assert text == GOLDEN.read_text(), "default render changed: review, then TANDEM_UPDATE_GOLDEN=1"


def test_default_render_has_exactly_these_objects(chart: Any) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render(chart))
    assert kinds == sorted(
        [
            ("Deployment", f"{FULLNAME}-gateway"),
            ("Service", f"{FULLNAME}-gateway"),
            ("Deployment", f"{FULLNAME}-prefill"),
            ("Service", f"{FULLNAME}-prefill-metrics"),
            ("Deployment", f"{FULLNAME}-decode"),
            ("Service", f"{FULLNAME}-decode-metrics"),
            ("StatefulSet", f"{FULLNAME}-redis"),
            ("Service", f"{FULLNAME}-redis"),
            ("NetworkPolicy", f"{FULLNAME}-workers"),
            ("NetworkPolicy", f"{FULLNAME}-gateway"),
            ("NetworkPolicy", f"{FULLNAME}-redis"),
            ("Secret", f"{FULLNAME}-auth"),
            ("Secret", f"{FULLNAME}-redis"),
            ("ConfigMap", f"{FULLNAME}-dashboard"),
        ]
    )


# --- values schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"gatway": {"replicas": 2}}, "additional properties 'gatway' not allowed"),
        ({"prefill": {"gpu": 2}}, "additional properties 'gpu' not allowed"),
        ({"decode": {"resources": {"limit": {"cpu": 1}}}}, "additional properties 'limit' not allowed"),
        ({"autoscaler": {"decode": {"targetKvUsage": 1.5}}}, "/autoscaler/decode/targetKvUsage"),
        ({"gateway": {"policy": "fastest"}}, "/gateway/policy"),
        ({"worker": {"grpcPort": "50051"}}, "/worker/grpcPort"),
    ],
)
def test_a_typo_or_bad_value_fails_the_render_with_a_schema_error(
    chart: Any, values: dict[str, Any], where: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema") as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(caught.value)


def test_schema_is_draft_07_closed_at_every_level_and_describes_every_value() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        return node

    def check(value: Any, node: dict[str, Any], where: str) -> None:
        node = resolve(node)
        if "properties" not in node:
            return  # a free-form Kubernetes object (resources, affinity, securityContext ...)
        assert node["additionalProperties"] is False, f"{where or '/'} is open"
        assert isinstance(value, dict) and set(value) == set(node["properties"]), where
        for key, child in value.items():
            check(child, node["properties"][key], f"{where}/{key}")

    check(yaml.safe_load((CHART_DIR / "values.yaml").read_text()), schema, "")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": {"hostPath": {"path": "/models"}}}, "both set"),
        ({"model": {"pvc": {"claimName": ""}}}, "set model.pvc.claimName or model.hostPath.path"),
        ({"redis": {"enabled": False}}, "redis.enabled=false needs redis.externalUrl or redis.externalUrlSecret.name"),
        ({"redis": {"externalUrl": EXTERNAL_REDIS}}, "set redis.enabled=false"),
        ({"redis": {"externalUrlSecret": {"name": "url"}}}, "set redis.enabled=false"),
        (
            {"redis": {"enabled": False, "externalUrl": EXTERNAL_REDIS, "externalUrlSecret": {"name": "url"}}},
            "redis.externalUrl and redis.externalUrlSecret.name are both set",
        ),
        (
            {"redis": {"enabled": False, "externalUrl": "rediss://:hunter2@redis.shared.svc:6380/0"}},
            "redis.externalUrl carries credentials, which would be visible in the pod spec",
        ),
        (
            {"redis": {"enabled": False, "externalUrlSecret": {"name": "url"}, "auth": {"existingSecret": "pw"}}},
            "the password goes inside the Secret's URL",
        ),
        (
            {"autoscaler": {"prefill": {"minReplicas": 3, "maxReplicas": 2}}},
            "greater than autoscaler.prefill.maxReplicas",
        ),
        (
            {"prefill": {"speculativeConfig": '{"method": "ngram", "num_speculative_tokens": 4}'}},
            "prefill.speculativeConfig: speculative decoding runs on the decode pool only",
        ),
    ],
)
def test_contradictory_values_fail_with_a_clear_message(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# --- gateway ----------------------------------------------------------------------------------


def test_gateway_command_probes_and_service(chart: Any) -> None:
    objects = render(
        chart,
        {
            "gateway": {"port": 8080, "service": {"port": 80}, "policy": "least_loaded"},
            "model": {"path": "Qwen2.5-0.5B"},
        },
    )
    gw = container(objects, "gateway")
    assert gw["command"] == ["tandem"]
    assert gw["args"] == [
        "gateway",
        "--model",
        "/models/Qwen2.5-0.5B",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--redis",
        EMBEDDED_REDIS,
        "--cluster",
        "default",
        "--policy",
        "least_loaded",
        "--guardrail-window-chars",
        "64",
        "--session-key",
        "header",
        "--session-header",
        "x-session-id",
        "--affinity-ttl-s",
        "600",
    ]
    assert gw["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert gw["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert gw["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert gw["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert gw["volumeMounts"][0] == {"name": "model", "mountPath": "/models", "readOnly": True}
    service = one(objects, "Service", f"{FULLNAME}-gateway")["spec"]
    assert service["type"] == "ClusterIP"
    assert service["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]


def test_gateway_guardrails_and_session_affinity_reach_its_command(chart: Any) -> None:
    spec = 'regex_redactor,blocklist:{"words": ["secret"]}'
    gateway = {
        "guardrails": spec,
        "guardrailWindowChars": 32,
        "sessionAffinity": {"key": "user", "header": "x-conversation", "ttlSeconds": 120},
    }
    args = container(render(chart, {"gateway": gateway}), "gateway")["args"]
    assert flag(args, "--guardrails") == spec
    assert flag(args, "--guardrail-window-chars") == "32"
    assert (flag(args, "--session-key"), flag(args, "--session-header")) == ("user", "x-conversation")
    assert flag(args, "--affinity-ttl-s") == "120"


def test_gateway_api_keys_come_from_a_secret(chart: Any) -> None:
    gw = container(render(chart, {"gateway": {"apiKeysSecret": {"name": "keys", "key": "list"}}}), "gateway")
    env = {e["name"]: e for e in gw["env"]}
    assert env["TANDEM_API_KEYS"]["valueFrom"] == {"secretKeyRef": {"name": "keys", "key": "list"}}
    assert "TANDEM_API_KEYS" not in {e["name"] for e in container(render(chart), "gateway")["env"]}


# --- every command the chart runs is one the `tandem` CLI accepts ----------------------------


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


@pytest.mark.parametrize("scenario", ["everything-on", "external-redis-url-secret", "multi-node", "single-node"])
def test_every_rendered_command_parses_with_the_tandem_cli(chart: Any, scenario: str) -> None:
    from tandem.cli import build_parser

    parser = build_parser()
    env = {
        "POD_IP": "10.1.2.3",
        "POD_NAME": "demo-tandem-decode-7d9f-abcde",
        "TANDEM_REDIS_PASSWORD": "s3cret",
        "TANDEM_REDIS_URL": "rediss://tandem:s3cret@redis.example:6380/0",
    }
    objects = render(chart, SCENARIOS[scenario])
    tandem_containers = [c for o in find(objects, "Deployment") for c in o["spec"]["template"]["spec"]["containers"]]
    assert {c["args"][0] for c in tandem_containers} >= {"gateway", "prefill", "decode"}
    for c in tandem_containers:
        assert c["command"] == ["tandem"]
        args = parser.parse_args([_expand(a, env) for a in c["args"]])
        assert args.command == c["args"][0]
        if args.command in ("prefill", "decode"):
            assert (args.host, args.advertise_host, args.port) == ("10.1.2.3", "10.1.2.3", 50051)
            assert args.worker_id == env["POD_NAME"]
            hook = shlex.split(c["lifecycle"]["preStop"]["exec"]["command"][2].replace("$POD_IP", env["POD_IP"]))
            drain = parser.parse_args(hook[2:])
            assert (drain.command, drain.address) == ("drain", "10.1.2.3:50051")
            assert drain.timeout_s == args.drain_timeout_s


# --- workers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_command(chart: Any, role: str) -> None:
    objects = render(
        chart,
        {
            role: {"extraArgs": ["--kv-cache-mib", "4096"]},
            "cluster": "blue",
            "model": {"path": "llama", "kvCacheDtype": "fp8"},
        },
    )
    worker = container(objects, role)
    drain = {"prefill": "60", "decode": "120"}[role]
    assert worker["command"] == ["tandem"]
    assert worker["args"] == [
        role,
        "--model",
        "/models/llama",
        "--worker-id",
        "$(POD_NAME)",
        "--host",
        "$(POD_IP)",
        "--advertise-host",
        "$(POD_IP)",
        "--port",
        "50051",
        "--metrics-port",
        "9100",
        "--redis",
        EMBEDDED_REDIS,
        "--cluster",
        "blue",
        "--drain-timeout-s",
        drain,
        "--device",
        "cuda",
        "--kv-transport",
        "grpc",
        "--kv-cache-dtype",
        "fp8",
        "--kv-cache-mib",
        "4096",
    ]
    env = {e["name"]: e for e in worker["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert worker["ports"] == [
        {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9100, "protocol": "TCP"},
    ]


def test_speculative_config_reaches_the_decode_command_only(chart: Any) -> None:
    from tandem.cli import build_parser

    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    objects = render(chart, {"decode": {"speculativeConfig": spec}})
    decode_args = container(objects, "decode")["args"]
    at = decode_args.index("--speculative-config")
    assert decode_args[at + 1] == spec
    assert "--speculative-config" not in container(objects, "prefill")["args"]
    parsed = build_parser().parse_args([a.replace("$(POD_IP)", "10.0.0.1") for a in decode_args])
    assert parsed.speculative_config == spec


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_worker_probes_are_native_grpc_health_checks(chart: Any, role: str) -> None:
    worker = container(render(chart, {"worker": {"grpcPort": 50099}}), role)
    assert worker["startupProbe"]["grpc"] == {"port": 50099, "service": ""}
    assert worker["livenessProbe"]["grpc"] == {"port": 50099, "service": ""}
    # NOT_SERVING while draining: the pod leaves the endpoints before it stops.
    assert worker["readinessProbe"]["grpc"] == {"port": 50099, "service": "tandem.v1.Worker"}
    # the names the worker serves (services/tandem/worker/health.py)
    from tandem.worker.health import LIVENESS_SERVICE, READINESS_SERVICE

    assert (LIVENESS_SERVICE, READINESS_SERVICE) == ("", "tandem.v1.Worker")
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load needs minutes"


@pytest.mark.parametrize(("role", "drain_s"), [("prefill", 60), ("decode", 120), ("decode", 7)])
def test_prestop_drains_within_the_grace_period(chart: Any, role: str, drain_s: int) -> None:
    objects = render(chart, {role: {"drainTimeoutSeconds": drain_s}})
    pod = one(objects, "Deployment", f"{FULLNAME}-{role}")["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    command = worker["lifecycle"]["preStop"]["exec"]["command"]
    # exec hooks do not expand $(POD_IP): a shell must read the environment variable.
    assert command[:2] == ["/bin/sh", "-c"] and len(command) == 3
    assert shlex.split(command[2]) == [
        "exec",
        "tandem",
        "drain",
        "--address",
        "$POD_IP:50051",
        "--timeout-s",
        str(drain_s),
    ]
    assert flag(worker["args"], "--drain-timeout-s") == str(drain_s)
    assert pod["terminationGracePeriodSeconds"] == drain_s + 30
    assert pod["terminationGracePeriodSeconds"] > drain_s


def test_gpu_limits_per_pool_and_absent_at_zero(chart: Any) -> None:
    objects = render(chart, {"prefill": {"gpus": 2}, "decode": {"gpus": 0}})
    prefill = container(objects, "prefill")["resources"]
    decode = container(objects, "decode")["resources"]
    assert prefill["limits"] == {"nvidia.com/gpu": 2, "memory": "32Gi"}
    assert prefill["requests"] == {"cpu": "4", "memory": "16Gi"}
    assert decode["limits"] == {"memory": "32Gi"}
    assert "nvidia.com/gpu" not in decode["requests"]
    default = render(chart)
    for role in ("prefill", "decode"):
        assert container(default, role)["resources"]["limits"]["nvidia.com/gpu"] == 1
    for component in ("gateway", "redis"):
        assert "nvidia.com/gpu" not in json.dumps(container(default, component))
    no_resources = render(chart, {"decode": {"gpus": 3, "resources": None}})  # null deletes a default
    assert container(no_resources, "decode")["resources"] == {"limits": {"nvidia.com/gpu": 3}}


def test_each_pool_has_its_own_replicas_and_scheduling(chart: Any) -> None:
    taint = [{"key": "pool", "operator": "Equal", "value": "decode", "effect": "NoSchedule"}]
    affinity = {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
            ]
        }
    }
    objects = render(
        chart,
        {
            "prefill": {"replicas": 3, "nodeSelector": {"pool": "prefill"}},
            "decode": {"replicas": 5, "tolerations": taint, "affinity": affinity},
        },
    )
    prefill = one(objects, "Deployment", f"{FULLNAME}-prefill")["spec"]
    decode = one(objects, "Deployment", f"{FULLNAME}-decode")["spec"]
    assert (prefill["replicas"], decode["replicas"]) == (3, 5)
    assert prefill["template"]["spec"]["nodeSelector"] == {"pool": "prefill"}
    assert "tolerations" not in prefill["template"]["spec"]
    assert decode["template"]["spec"]["tolerations"] == taint
    assert decode["template"]["spec"]["affinity"] == affinity
    assert "nodeSelector" not in decode["template"]["spec"]


@pytest.mark.parametrize("values", [{"autoscaler": {"enabled": True}}, {"keda": {"enabled": True}}])
def test_autoscaled_pools_leave_replicas_to_the_autoscaler(chart: Any, values: dict[str, Any]) -> None:
    objects = render(chart, values)
    for role in ("prefill", "decode"):
        assert "replicas" not in one(objects, "Deployment", f"{FULLNAME}-{role}")["spec"]
    assert one(objects, "Deployment", f"{FULLNAME}-gateway")["spec"]["replicas"] == 1


@pytest.mark.parametrize(
    ("values", "volume"),
    [
        ({}, {"name": "model", "persistentVolumeClaim": {"claimName": "tandem-models", "readOnly": True}}),
        (
            {"model": {"pvc": {"claimName": ""}, "hostPath": {"path": "/srv/models"}}},
            {"name": "model", "hostPath": {"path": "/srv/models", "type": "Directory"}},
        ),
    ],
)
def test_model_volume_is_mounted_read_only_everywhere(
    chart: Any, values: dict[str, Any], volume: dict[str, Any]
) -> None:
    objects = render(chart, values)
    for component in ("gateway", "prefill", "decode"):
        pod = one(objects, "Deployment", f"{FULLNAME}-{component}")["spec"]["template"]["spec"]
        assert [v for v in pod["volumes"] if v["name"] == "model"] == [volume]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_pods_run_as_non_root_with_a_read_only_root_and_no_capabilities(chart: Any) -> None:
    objects = render(chart, SCENARIOS["everything-on"])
    workloads = find(objects, "Deployment") + find(objects, "StatefulSet")
    assert len(workloads) == 5
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }
        # only the autoscaler talks to the Kubernetes API
        is_autoscaler = workload["metadata"]["name"] == f"{FULLNAME}-autoscaler"
        assert pod["automountServiceAccountToken"] is is_autoscaler


def test_standard_labels_on_every_object(chart: Any) -> None:
    for obj in render(chart, SCENARIOS["everything-on"]) + render(chart, SCENARIOS["keda"]):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "tandem"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "tandem-0.1.0"
        assert labels["app.kubernetes.io/component"]


# --- autoscaler and RBAC ----------------------------------------------------------------------


def test_autoscaler_command(chart: Any) -> None:
    objects = render(chart, {"autoscaler": {"enabled": True, "decode": {"targetKvUsage": 0.75, "maxReplicas": 9}}})
    autoscaler = container(objects, "autoscaler")
    assert autoscaler["command"] == ["tandem"]
    assert autoscaler["args"] == [
        "autoscaler",
        "--redis",
        EMBEDDED_REDIS,
        "--cluster",
        "default",
        "--actuator",
        "kubernetes",
        "--namespace",
        NAMESPACE,
        "--prefill-deployment",
        f"{FULLNAME}-prefill",
        "--decode-deployment",
        f"{FULLNAME}-decode",
        "--prefill-min",
        "1",
        "--prefill-max",
        "4",
        "--decode-min",
        "1",
        "--decode-max",
        "9",
        "--prefill-target-queued-tokens",
        "8192",
        "--decode-target-waiting",
        "4",
        "--decode-target-kv-usage",
        "0.75",
        "--interval-s",
        "5",
        "--stabilisation-window-s",
        "60",
        "--host",
        "0.0.0.0",
        "--metrics-port",
        "9400",
    ]
    deployment = one(objects, "Deployment", f"{FULLNAME}-autoscaler")["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    assert deployment["template"]["spec"]["serviceAccountName"] == f"{FULLNAME}-autoscaler"


def test_autoscaler_rbac_is_exactly_get_and_patch_of_the_two_worker_scales(chart: Any) -> None:
    objects = render(chart, {"autoscaler": {"enabled": True}})
    (role,) = find(objects, "Role")
    assert role["metadata"]["name"] == f"{FULLNAME}-autoscaler"
    assert role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": [f"{FULLNAME}-prefill", f"{FULLNAME}-decode"],
            "verbs": ["get", "patch"],
        }
    ]
    (binding,) = find(objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": f"{FULLNAME}-autoscaler",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULLNAME}-autoscaler", "namespace": NAMESPACE}]
    assert len(find(objects, "ServiceAccount")) == 1
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    # the names in the rule are the Deployments the chart renders
    for name in role["rules"][0]["resourceNames"]:
        one(objects, "Deployment", name)


def test_no_autoscaler_or_rbac_by_default(chart: Any) -> None:
    objects = render(chart)
    for kind in ("Role", "RoleBinding", "ServiceAccount", "ScaledObject", "ServiceMonitor"):
        assert not find(objects, kind), kind


def test_keda_replaces_the_autoscaler_with_scaled_objects(chart: Any) -> None:
    objects = render(
        chart,
        {
            "keda": {"enabled": True},
            "autoscaler": {
                "enabled": True,
                "stabilisationWindowSeconds": 90,
                "prefill": {"minReplicas": 2, "maxReplicas": 6},
                "decode": {"minReplicas": 1, "maxReplicas": 12},
            },
        },
    )
    assert not find(objects, "Deployment", f"{FULLNAME}-autoscaler")
    assert not find(objects, "Role") and not find(objects, "ServiceAccount")
    scaled = {o["metadata"]["name"]: o["spec"] for o in find(objects, "ScaledObject")}
    assert set(scaled) == {f"{FULLNAME}-prefill", f"{FULLNAME}-decode"}
    server = "http://prometheus-operated.monitoring.svc:9090"
    selector = '{namespace="llm",service="demo-tandem-%s-metrics"}'
    for role, (low, high) in {"prefill": (2, 6), "decode": (1, 12)}.items():
        spec = scaled[f"{FULLNAME}-{role}"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULLNAME}-{role}"}
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (low, high)
        assert spec["pollingInterval"] == 15 and spec["cooldownPeriod"] == 300
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior == {"scaleDown": {"stabilizationWindowSeconds": 90}}
        metric, threshold = {
            "prefill": ("tandem_queued_prefill_tokens", "8192"),
            "decode": ("vllm:num_requests_waiting", "4"),
        }[role]
        assert spec["triggers"][0] == {
            "type": "prometheus",
            "metricType": "AverageValue",
            "metadata": {"serverAddress": server, "query": f"sum({metric}{selector % role})", "threshold": threshold},
        }
    assert len(scaled[f"{FULLNAME}-prefill"]["triggers"]) == 1
    assert scaled[f"{FULLNAME}-decode"]["triggers"][1] == {
        "type": "prometheus",
        "metricType": "Value",
        "metadata": {
            "serverAddress": server,
            "query": f"avg(vllm:kv_cache_usage_perc{selector % 'decode'})",
            "threshold": "0.8",
        },
    }


def test_keda_queries_and_thresholds_are_configurable(chart: Any) -> None:
    objects = render(
        chart,
        {
            "keda": {
                "enabled": True,
                "prometheus": {"serverAddress": "http://prom:9090"},
                "prefill": {"query": "sum(tandem_queued)", "threshold": "8192"},
            }
        },
    )
    trigger = one(objects, "ScaledObject", f"{FULLNAME}-prefill")["spec"]["triggers"][0]
    assert trigger["metadata"] == {
        "serverAddress": "http://prom:9090",
        "query": "sum(tandem_queued)",
        "threshold": "8192",
    }


# --- Redis ------------------------------------------------------------------------------------


def test_embedded_redis(chart: Any) -> None:
    objects = render(chart, {"redis": {"persistence": {"enabled": True, "size": "2Gi"}}})
    sts = one(objects, "StatefulSet", f"{FULLNAME}-redis")["spec"]
    assert sts["replicas"] == 1 and sts["serviceName"] == f"{FULLNAME}-redis"
    redis = sts["template"]["spec"]["containers"][0]
    assert redis["image"] == "redis:7-alpine"
    assert flag(redis["args"], "--appendonly") == "yes"
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "2Gi"}}
    assert "volumes" not in sts["template"]["spec"]
    service = one(objects, "Service", f"{FULLNAME}-redis")["spec"]
    assert service["clusterIP"] == "None"
    assert service["ports"] == [{"name": "redis", "port": 6379, "targetPort": "redis", "protocol": "TCP"}]
    ephemeral = one(render(chart), "StatefulSet", f"{FULLNAME}-redis")["spec"]
    assert "volumeClaimTemplates" not in ephemeral
    assert ephemeral["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]


def test_external_redis_renders_no_redis_objects_and_every_component_uses_it(chart: Any) -> None:
    objects = render(chart, SCENARIOS["external-redis"])
    assert not find(objects, "StatefulSet")
    assert not [o for o in objects if "redis" in o["metadata"]["name"]]
    components = ("gateway", "prefill", "decode", "autoscaler")
    for component in components:
        assert flag(container(objects, component)["args"], "--redis") == EXTERNAL_REDIS
    assert len(find(objects, "Deployment")) == len(components)


# --- network policies -------------------------------------------------------------------------


def _release_pods(*components: str) -> dict[str, Any]:
    selector: dict[str, Any] = {
        "matchLabels": {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": RELEASE}
    }
    if components:
        selector["matchExpressions"] = [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": list(components)}
        ]
    return selector


def _component_pods(component: str) -> dict[str, Any]:
    return {"matchLabels": {**_release_pods()["matchLabels"], "app.kubernetes.io/component": component}}


PROMETHEUS_PEER = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def test_network_policies_keep_grpc_and_redis_inside_the_release(chart: Any) -> None:
    objects = render(chart, {"autoscaler": {"enabled": True}})
    policies = {o["metadata"]["name"]: o["spec"] for o in find(objects, "NetworkPolicy")}
    assert policies == {
        f"{FULLNAME}-workers": {
            "podSelector": _release_pods("prefill", "decode"),
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": _release_pods("gateway", "prefill", "decode")}],
                    "ports": [{"protocol": "TCP", "port": 50051}],
                },
                {"ports": [{"protocol": "TCP", "port": 9100}], "from": [PROMETHEUS_PEER]},
            ],
        },
        f"{FULLNAME}-redis": {
            "podSelector": _component_pods("redis"),
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": _release_pods()}], "ports": [{"protocol": "TCP", "port": 6379}]}],
        },
        f"{FULLNAME}-gateway": {
            "podSelector": _component_pods("gateway"),
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": 8000}]}],
        },
        f"{FULLNAME}-autoscaler": {
            "podSelector": _component_pods("autoscaler"),
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": 9400}], "from": [PROMETHEUS_PEER]}],
        },
    }
    # the selectors match the pods the chart renders
    for component in ("gateway", "prefill", "decode", "redis", "autoscaler"):
        workload = next(
            o
            for o in objects
            if o["metadata"]["name"] == f"{FULLNAME}-{component}" and o["kind"] in ("Deployment", "StatefulSet")
        )
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == component
        assert labels["app.kubernetes.io/instance"] == RELEASE


def test_network_policy_sources_are_configurable(chart: Any) -> None:
    ingress_peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    objects = render(
        chart,
        {
            "networkPolicy": {
                "gateway": {"from": [ingress_peer]},
                "workerMeshAllPorts": True,
                "metrics": {"from": [{"namespaceSelector": monitoring}]},
            }
        },
    )
    gateway = one(objects, "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
    assert gateway["ingress"] == [{"from": [ingress_peer], "ports": [{"protocol": "TCP", "port": 8000}]}]
    workers = one(objects, "NetworkPolicy", f"{FULLNAME}-workers")["spec"]["ingress"]
    assert workers[1]["from"] == [{"namespaceSelector": monitoring}]
    assert workers[2] == {"from": [{"podSelector": _release_pods("prefill", "decode")}]}  # every port
    assert not find(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


# --- ServiceMonitors --------------------------------------------------------------------------


def test_service_monitors_scrape_gateway_workers_and_autoscaler(chart: Any) -> None:
    objects = render(
        chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}, "autoscaler": {"enabled": True}}
    )
    monitors = {o["metadata"]["name"]: o for o in find(objects, "ServiceMonitor")}
    expected = {
        "gateway": ("gateway", "http"),
        "prefill-metrics": ("prefill", "metrics"),
        "decode-metrics": ("decode", "metrics"),
        "autoscaler": ("autoscaler", "metrics"),
    }
    assert set(monitors) == {f"{FULLNAME}-{s}" for s in expected}
    for service_suffix, (_component, port) in expected.items():
        monitor = monitors[f"{FULLNAME}-{service_suffix}"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prom"
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert spec["endpoints"] == [{"port": port, "path": "/metrics", "interval": "15s"}]
        # the selector picks exactly the Service named like the monitor, by a port it has
        matched = [
            s
            for s in find(objects, "Service")
            if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert [s["metadata"]["name"] for s in matched] == [f"{FULLNAME}-{service_suffix}"]
        assert port in {p["name"] for p in matched[0]["spec"]["ports"]}
    for role in ("prefill", "decode"):
        service = one(objects, "Service", f"{FULLNAME}-{role}-metrics")["spec"]
        assert service["clusterIP"] == "None"
        assert service["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]


# --- example values ---------------------------------------------------------------------------


def test_single_node_example(chart: Any) -> None:
    objects = render(chart, SCENARIOS["single-node"])
    assert one(objects, "StatefulSet", f"{FULLNAME}-redis")
    assert not find(objects, "Deployment", f"{FULLNAME}-autoscaler")
    for role in ("prefill", "decode"):
        deployment = one(objects, "Deployment", f"{FULLNAME}-{role}")["spec"]
        assert deployment["replicas"] == 1
        assert "nodeSelector" not in deployment["template"]["spec"]
        model = [v for v in deployment["template"]["spec"]["volumes"] if v["name"] == "model"]
        assert model == [{"name": "model", "hostPath": {"path": "/var/lib/tandem/models", "type": "Directory"}}]
        assert flag(container(objects, role)["args"], "--model") == "/models/Qwen2.5-0.5B-Instruct"


def test_multi_node_example(chart: Any) -> None:
    values = SCENARIOS["multi-node"]
    objects = render(chart, values)
    assert not find(objects, "StatefulSet")
    assert one(objects, "Deployment", f"{FULLNAME}-autoscaler")
    for role in ("prefill", "decode"):
        pod = one(objects, "Deployment", f"{FULLNAME}-{role}")["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"tandem.dev/pool": role}
        assert {"key": "tandem.dev/pool", "operator": "Equal", "value": role, "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        model = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if v["name"] == "model"]
        assert model == ["llm-models"]
        worker = container(objects, role)
        assert flag(worker["args"], "--redis") == "redis://:$(TANDEM_REDIS_PASSWORD)@redis-master.redis.svc:6379/0"
        env = {e["name"]: e for e in worker["env"]}
        assert env["TANDEM_REDIS_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "tandem-redis", "key": "redis-password"}
        }
    # the external Redis's password is the user's Secret: the chart generates only the token's
    assert [s["metadata"]["name"] for s in find(objects, "Secret")] == [f"{FULLNAME}-auth"]


# --- Dockerfile -------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = (DEPLOY_DIR / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in logical.splitlines()
        if line.strip()
    ]


def test_dockerfile_one_non_root_cuda_image_with_tandem_entrypoint() -> None:
    instructions = _dockerfile_instructions()
    args = {}
    for op, rest in instructions:
        if op == "ARG" and "=" in rest:
            name, default = rest.split("=", 1)
            args[name] = default
    stages = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    final = instructions[stages[-1] :]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], final[0][1]).split()[0]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d\d\.\d\d", base), base
    entrypoints = [rest for op, rest in final if op == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [["tandem"]]
    users = [rest for op, rest in final if op == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid, so runAsNonRoot can check it"
    assert uid == str(yaml.safe_load((CHART_DIR / "values.yaml").read_text())["podSecurityContext"]["runAsUser"])
    # no model baked in: nothing is copied into or downloaded to /models
    assert not [rest for op, rest in instructions if "/models" in rest or "huggingface" in rest.lower()]


def test_served_model_name_reaches_the_gateway_and_both_pools(chart: Any) -> None:
    """Workers label their `vllm:` series `model_name` with it, as the gateway names the model."""
    objects = render(chart, {"model": {"servedModelName": "llama-3-8b"}})
    for component in ("gateway", "prefill", "decode"):
        assert flag(container(objects, component)["args"], "--served-model-name") == "llama-3-8b"
    default = render(chart)
    for component in ("gateway", "prefill", "decode"):
        assert "--served-model-name" not in container(default, component)["args"]
