"""`KubernetesActuator` through the official `kubernetes` client, against a STAND-IN API server.

No real Kubernetes API server can run on the machines these tests run on. `kube_api.FakeKubeApi`
is a small stdlib HTTP server (127.0.0.1:0, in a thread) that implements only GET and PATCH of
`/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale` (an `autoscaling/v1` Scale; merge and
strategic merge patches; 404 with a Status for unknown deployments) and records every request.
The real client is pointed at it through a generated kubeconfig file with a bearer token, so
these tests check the exact requests the client sends (method, path, content type, body,
Authorization) and what the actuator makes of the answers; not the real API server's behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.autoscaler.autoscaler import Autoscaler
from tandem.autoscaler.config import AutoscalerConfig, PrefillPolicy
from tandem.autoscaler.kubernetes import (
    KubernetesActuator,
    KubernetesActuatorError,
    apps_v1_api,
    in_cluster_namespace,
)
from tandem.autoscaler.metrics import AutoscalerMetrics
from tandem.autoscaler.policy import ScaleDecision, ScaleReason
from tandem.common.cluster_state import ClusterState
from tandem.common.embedded_redis import free_port
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tests.integration.kube_api import TOKEN, FakeKubeApi, RecordedRequest

P, D = WorkerRole.PREFILL, WorkerRole.DECODE
NS = "tandem"
SCALE = "/apis/apps/v1/namespaces/tandem/deployments/{}/scale"
BEARER = f"Bearer {TOKEN}"
MERGE_PATCH = "application/merge-patch+json"


@pytest.fixture
def kube_api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi({(NS, "tandem-prefill"): 2, (NS, "tandem-decode"): 3}) as api:
        yield api


def actuator_for(kube_api: FakeKubeApi, tmp_path: Path, decode: str = "tandem-decode") -> KubernetesActuator:
    api = apps_v1_api(kube_api.write_kubeconfig(tmp_path / "kubeconfig"))
    return KubernetesActuator(NS, {P: "tandem-prefill", D: decode}, api=api)


def test_replicas_reads_the_scale(kube_api, tmp_path):
    actuator = actuator_for(kube_api, tmp_path)
    try:
        assert (actuator.replicas(P), actuator.replicas(D)) == (2, 3)
    finally:
        actuator.close()
    assert kube_api.recorded() == [
        RecordedRequest("GET", SCALE.format("tandem-prefill"), None, None, BEARER),
        RecordedRequest("GET", SCALE.format("tandem-decode"), None, None, BEARER),
    ]


def test_scale_sends_a_merge_patch_and_reads_back(kube_api, tmp_path):
    actuator = actuator_for(kube_api, tmp_path)
    try:
        actuator.scale(D, 5)
        actuator.scale(P, 0)
        assert (actuator.replicas(P), actuator.replicas(D)) == (0, 5)
    finally:
        actuator.close()
    assert kube_api.recorded()[:2] == [
        RecordedRequest("PATCH", SCALE.format("tandem-decode"), MERGE_PATCH, {"spec": {"replicas": 5}}, BEARER),
        RecordedRequest("PATCH", SCALE.format("tandem-prefill"), MERGE_PATCH, {"spec": {"replicas": 0}}, BEARER),
    ]
    assert kube_api.deployments == {(NS, "tandem-prefill"): 0, (NS, "tandem-decode"): 5}


@pytest.mark.parametrize(
    ("call", "verb"),
    [
        pytest.param(lambda a: a.replicas(D), "read", id="read"),
        pytest.param(lambda a: a.scale(D, 4), "patch", id="patch"),
    ],
)
def test_unknown_deployment_is_a_clear_error(kube_api, tmp_path, call, verb):
    actuator = actuator_for(kube_api, tmp_path, decode="no-such-deployment")
    try:
        with pytest.raises(KubernetesActuatorError) as caught:
            call(actuator)
    finally:
        actuator.close()
    assert str(caught.value) == (
        f"cannot {verb} the scale of the decode deployment tandem/no-such-deployment: "
        f'HTTP 404 Not Found: deployments.apps "no-such-deployment" not found'
    )
    assert kube_api.deployments == {(NS, "tandem-prefill"): 2, (NS, "tandem-decode"): 3}


def test_unreachable_api_server_is_a_clear_error(tmp_path):
    with FakeKubeApi({}) as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    text = kubeconfig.read_text().replace(api.url, f"http://127.0.0.1:{free_port()}")
    kubeconfig.write_text(text)
    actuator = KubernetesActuator(NS, {P: "tandem-prefill", D: "tandem-decode"}, api=apps_v1_api(kubeconfig))
    with pytest.raises(
        KubernetesActuatorError,
        match="^cannot read the scale of the prefill deployment tandem/tandem-prefill: MaxRetryError: ",
    ):
        actuator.replicas(P)
    actuator.close()


def test_negative_replicas_are_refused_before_any_request(kube_api, tmp_path):
    actuator = actuator_for(kube_api, tmp_path)
    with pytest.raises(ValueError, match="^replicas must be an int >= 0, got -1$"):
        actuator.scale(P, -1)
    actuator.close()
    assert kube_api.recorded() == []


@pytest.mark.parametrize(
    ("namespace", "deployments", "message"),
    [
        pytest.param(
            "Tandem",
            {P: "a", D: "b"},
            "namespace must be an RFC 1123 label (lowercase a-z, 0-9, '-'), got 'Tandem'",
            id="bad-namespace",
        ),
        pytest.param(NS, {D: "b"}, "no deployment named for pool(s) prefill", id="missing-pool"),
        pytest.param(
            NS,
            {P: "a", D: "b_c"},
            "decode deployment name must be an RFC 1123 subdomain, got 'b_c'",
            id="bad-deployment-name",
        ),
    ],
)
def test_constructor_validation(kube_api, tmp_path, namespace, deployments, message):
    api = apps_v1_api(kube_api.write_kubeconfig(tmp_path / "kubeconfig"))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        KubernetesActuator(namespace, deployments, api=api)
    api.api_client.close()


def test_config_loading_errors_say_what_to_do(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(
        ValueError, match=f"^{re.escape(f'cannot load the Kubernetes client config from kubeconfig {missing}: ')}"
    ):
        apps_v1_api(missing)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(
        ValueError, match=re.escape("in-cluster service account (outside a pod, pass --kubeconfig PATH)")
    ):
        apps_v1_api(None)


def test_in_cluster_namespace(tmp_path):
    (tmp_path / "namespace").write_text("serving\n")
    assert in_cluster_namespace(tmp_path / "namespace") == "serving"
    assert in_cluster_namespace(tmp_path / "absent") == "default"


def test_autoscaler_step_patches_the_deployment(kube_api, tmp_path, redis_client):
    """The whole path: loads in Redis -> policy -> PATCH of the prefill Deployment's scale."""
    state = ClusterState(redis_client, "k8s")
    now_s = 1_700_000_000.0
    for worker_id, role, queued in [("p-0", P, 4000), ("p-1", P, 4000), ("d-0", D, 0), ("d-1", D, 0), ("d-2", D, 0)]:
        state.register(WorkerInfo(worker_id, role, f"{worker_id}:7000", "ab12", 100, "t"), ttl_s=60.0)
        state.publish_load(worker_id, WorkerLoad(4 if role is D else 0, 1, queued, 0, 100, now_s), ttl_s=60.0)
    config = AutoscalerConfig(
        prefill=PrefillPolicy(min_replicas=0, max_replicas=8, target_queued_tokens_per_replica=1000)
    )
    actuator = actuator_for(kube_api, tmp_path)
    try:
        decisions = Autoscaler(state, actuator, config, AutoscalerMetrics(), clock=lambda: now_s).step()
    finally:
        actuator.close()
    assert decisions == [
        ScaleDecision(P, 2, 8, ScaleReason.QUEUE_ABOVE_TARGET),
        ScaleDecision(D, 3, 3, ScaleReason.WITHIN_TOLERANCE),
    ]
    assert [(r.method, r.path, r.body) for r in kube_api.recorded()] == [
        ("GET", SCALE.format("tandem-prefill"), None),
        ("GET", SCALE.format("tandem-decode"), None),
        ("PATCH", SCALE.format("tandem-prefill"), {"spec": {"replicas": 8}}),
    ]
