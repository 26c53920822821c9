"""The Kubernetes actuator: scales the prefill and decode Deployments through their `scale`
subresource (`GET` / `PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`).

- `replicas(role)` is the Scale's `spec.replicas`: the count Kubernetes is converging to. Pods
  that are terminating (running their `preStop` drain, `tandem drain`) are not in it, which is
  the actuator contract: draining workers do not count as capacity.
- `scale(role, n)` sends the merge patch `{"spec": {"replicas": n}}` and returns once the API
  server has accepted it. Kubernetes chooses the pods to remove; each one drains in its
  `preStop` hook before SIGTERM. The autoscaler's service account needs `get` and `patch` on
  `deployments/scale` in its namespace (the Helm chart's Role grants exactly that).
- Every API call has a timeout (`request_timeout_s`). A failed call raises
  `KubernetesActuatorError`, whose message names the deployment and the HTTP status.

`apps_v1_api(kubeconfig)` builds the client: from a kubeconfig file when a path is given (a
developer's laptop, tests), else from the pod's service account (in-cluster).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from tandem.common.workers import WorkerRole

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "default"
DEFAULT_REQUEST_TIMEOUT_S = 10.0
MERGE_PATCH = "application/merge-patch+json"
_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1123 label (namespace)
_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # RFC 1123 subdomain
_T = TypeVar("_T")


class KubernetesActuatorError(RuntimeError):
    """A Kubernetes API call of the actuator failed (status, network or timeout)."""


def in_cluster_namespace(path: Path = NAMESPACE_FILE) -> str:
    """The pod's namespace from its service account, or "default" outside a cluster."""
    try:
        namespace = path.read_text(encoding="utf-8").strip()
    except OSError:
        return DEFAULT_NAMESPACE
    return namespace or DEFAULT_NAMESPACE


def apps_v1_api(kubeconfig: Path | None = None) -> k8s_client.AppsV1Api:
    """An `AppsV1Api` from the kubeconfig file at `kubeconfig` (its current context), or from
    the in-cluster service account when None. Raises ValueError when no config can be loaded."""
    configuration = k8s_client.Configuration()
    try:
        if kubeconfig is not None:
            k8s_config.load_kube_config(
                config_file=str(kubeconfig), client_configuration=configuration, persist_config=False
            )
        else:
            k8s_config.load_incluster_config(client_configuration=configuration)
    except (k8s_config.ConfigException, OSError) as exc:
        where = (
            f"kubeconfig {kubeconfig}"
            if kubeconfig is not None
            else ("the in-cluster service account (outside a pod, pass --kubeconfig PATH)")
        )
        raise ValueError(f"cannot load the Kubernetes client config from {where}: {exc}") from exc
    return k8s_client.AppsV1Api(k8s_client.ApiClient(configuration))


def _api_error_detail(exc: ApiException) -> str:
    """`HTTP 404 Not Found: <the API server's Status message>`."""
    detail = f"HTTP {exc.status} {exc.reason or ''}".rstrip()
    try:
        message = json.loads(exc.body or "")["message"]
    except (ValueError, TypeError, KeyError):
        return detail
    return f"{detail}: {message}"


class KubernetesActuator:
    """Scales one Deployment per pool in one namespace. Safe to call from several threads (the
    client's urllib3 pool is thread-safe); in practice the autoscaler loop is the only caller."""

    name = "kubernetes"

    def __init__(
        self,
        namespace: str,
        deployments: Mapping[WorkerRole, str],
        api: k8s_client.AppsV1Api | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        if not isinstance(namespace, str) or not _LABEL_RE.match(namespace):
            raise ValueError(f"namespace must be an RFC 1123 label (lowercase a-z, 0-9, '-'), got {namespace!r}")
        missing = [role.value for role in WorkerRole if role not in deployments]
        if missing:
            raise ValueError(f"no deployment named for pool(s) {', '.join(missing)}")
        for role, deployment in deployments.items():
            if not isinstance(deployment, str) or not _SUBDOMAIN_RE.match(deployment):
                raise ValueError(f"{role.value} deployment name must be an RFC 1123 subdomain, got {deployment!r}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s!r}")
        self._namespace = namespace
        self._deployments = dict(deployments)
        self._api = api if api is not None else apps_v1_api(None)
        self._timeout_s = request_timeout_s

    def replicas(self, role: WorkerRole) -> int:
        """The Deployment's desired replicas (`spec.replicas` of its Scale; absent means 0)."""
        scale = self._call(
            "read",
            role,
            lambda name: self._api.read_namespaced_deployment_scale(
                name, self._namespace, _request_timeout=self._timeout_s
            ),
        )
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0

    def scale(self, role: WorkerRole, replicas: int) -> None:
        """Set the Deployment's replicas (a merge patch of its Scale)."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be an int >= 0, got {replicas!r}")
        self._call(
            "patch",
            role,
            lambda name: self._api.patch_namespaced_deployment_scale(
                name,
                self._namespace,
                {"spec": {"replicas": replicas}},
                _content_type=MERGE_PATCH,
                _request_timeout=self._timeout_s,
            ),
        )

    def _call(self, verb: str, role: WorkerRole, request: Callable[[str], _T]) -> _T:
        """`request(deployment name)`, with its failures turned into KubernetesActuatorError."""
        name = self._deployments[role]
        try:
            return request(name)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            detail = _api_error_detail(exc) if isinstance(exc, ApiException) else f"{type(exc).__name__}: {exc}"
            raise KubernetesActuatorError(
                f"cannot {verb} the scale of the {role.value} deployment {self._namespace}/{name}: {detail}"
            ) from exc

    def close(self) -> None:
        """Close the API client's connection pool. The Deployments are left as they are."""
        self._api.api_client.close()
