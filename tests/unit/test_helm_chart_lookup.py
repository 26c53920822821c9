"""The generated Secrets are kept across upgrades: Helm's `lookup`, against a stand-in API server.

`helm_python.Config.render` renders the chart cluster-aware, as `helm upgrade` does: `lookup`
reads live objects and nothing else contacts the server. The stand-in below (a stdlib
`http.server` on 127.0.0.1:0) implements only what that needs: the core group's discovery
(`GET /api/v1`) and `GET /api/v1/namespaces/{ns}/secrets/{name}` (404 with a `Status` body for
an unknown Secret, like the real server). Every request path is recorded.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.unit.test_helm_chart import CHART_DIR, FULLNAME, NAMESPACE, RELEASE

SECRET_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets/([^/]+)$")
CORE_RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret", "verbs": ["get"]}
    ],
}


class StandInSecrets:
    """Secrets by (namespace, name) -> data (base64 values, as the API serves them)."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.paths: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                stand_in.paths.append(path)
                if path == "/api/v1":
                    self._send(200, CORE_RESOURCES)
                    return
                match = SECRET_PATH.match(path)
                data = stand_in.secrets.get((match[1], match[2])) if match else None
                if match and data is not None:
                    metadata = {"name": match[2], "namespace": match[1]}
                    self._send(200, {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "data": data})
                    return
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def api() -> Iterator[StandInSecrets]:
    stand_in = StandInSecrets()
    yield stand_in
    stand_in.stop()


def upgrade_render(api: StandInSecrets, values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Secret name -> its rendered data, rendered as `helm upgrade` would against `api`."""
    config = helm.Config(kube_apiserver=api.url, kube_token="stand-in", namespace=NAMESPACE, storage_driver="memory")
    try:
        with helm.Chart.load(CHART_DIR) as chart:
            rendered = config.render(chart, values, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    finally:
        config.close()
    text = rendered["tandem/templates/secrets.yaml"]
    return {doc["metadata"]["name"]: doc["data"] for doc in yaml.safe_load_all(text) if doc}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_an_upgrade_keeps_the_token_and_the_redis_password_in_the_cluster(api: StandInSecrets) -> None:
    api.secrets[(NAMESPACE, f"{FULLNAME}-auth")] = {"token": b64("token-made-at-install")}
    api.secrets[(NAMESPACE, f"{FULLNAME}-redis")] = {"redis-password": b64("password-made-at-install")}
    assert upgrade_render(api, {}) == {
        f"{FULLNAME}-auth": {"token": b64("token-made-at-install")},
        f"{FULLNAME}-redis": {"redis-password": b64("password-made-at-install")},
    }
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{FULLNAME}-auth" in api.paths
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{FULLNAME}-redis" in api.paths


def test_a_missing_secret_or_key_is_generated_anew(api: StandInSecrets) -> None:
    api.secrets[(NAMESPACE, f"{FULLNAME}-auth")] = {"other-key": b64("unrelated")}
    data = upgrade_render(api, {})
    token = base64.b64decode(data[f"{FULLNAME}-auth"]["token"]).decode()
    password = base64.b64decode(data[f"{FULLNAME}-redis"]["redis-password"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token) and re.fullmatch(r"[A-Za-z0-9]{48}", password)
    assert set(data[f"{FULLNAME}-auth"]) == {"token"}


def test_existing_secrets_are_neither_looked_up_nor_rendered(api: StandInSecrets) -> None:
    values = {"auth": {"existingSecret": "mine"}, "redis": {"auth": {"existingSecret": "mine-too"}}}
    assert upgrade_render(api, values) == {}
    assert not [p for p in api.paths if "/secrets/" in p]
