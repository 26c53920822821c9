"""A stand-in for the Kubernetes API server, for the actuator's tests.

No real API server (kube-apiserver, kind, k3s) can run on the machines these tests run on, so
this is a small stdlib `http.server` in a thread, bound to 127.0.0.1:0, that implements ONLY:

- `GET   /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`: the Deployment's `Scale`
  (`autoscaling/v1`), as the real API server returns it;
- `PATCH` the same path, with a JSON merge patch or strategic merge patch body
  (`application/merge-patch+json` | `application/strategic-merge-patch+json`, else 415) that
  may set `spec.replicas`; it answers the updated `Scale`.

Unknown deployments get 404 with a `Status` body, like the real server. Every request is
recorded (method, path with query, content type, parsed JSON body, Authorization header), so
tests can assert exactly what the official `kubernetes` client sent. It does not check auth,
resource versions or any other API.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$")
PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
TOKEN = "stand-in-token-0123456789"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    content_type: str | None
    body: Any  # parsed JSON, None without a body
    authorization: str | None


def scale_object(namespace: str, name: str, replicas: int) -> dict[str, Any]:
    """An `autoscaling/v1` Scale, as the API server serialises it."""
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "resourceVersion": "1"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": f"app={name}"},
    }


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubeApi:
    """The stand-in server. `deployments` maps (namespace, name) to replicas; it is updated by
    PATCH requests. Use as a context manager: the server thread stops on exit."""

    def __init__(self, deployments: dict[tuple[str, str], int]) -> None:
        self.deployments = dict(deployments)
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kube-api", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: Path, namespace: str = "tandem", token: str = TOKEN) -> Path:
        """A kubeconfig (JSON is YAML) whose current context is this server, with a bearer token."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "stand-in",
            "preferences": {},
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "autoscaler", "user": {"token": token}}],
            "contexts": [
                {"name": "stand-in", "context": {"cluster": "stand-in", "user": "autoscaler", "namespace": namespace}}
            ],
        }
        path.write_text(json.dumps(config), encoding="utf-8")
        return path

    def recorded(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self.requests)

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def _handle(
        self, method: str, path: str, content_type: str | None, raw: bytes, authorization: str | None
    ) -> tuple[int, dict[str, Any]]:
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append(RecordedRequest(method, path, content_type, body, authorization))
            match = SCALE_PATH.match(path.split("?", 1)[0])
            if match is None:
                return 404, status_object(404, "NotFound", "the server could not find the requested resource")
            namespace, name = match.groups()
            if (namespace, name) not in self.deployments:
                return 404, status_object(404, "NotFound", f'deployments.apps "{name}" not found')
            if method == "PATCH":
                if content_type not in PATCH_TYPES:
                    return 415, status_object(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")
                replicas = (body or {}).get("spec", {}).get("replicas")
                if replicas is not None:
                    self.deployments[(namespace, name)] = int(replicas)
            return 200, scale_object(namespace, name, self.deployments[(namespace, name)])

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                code, payload = api._handle(
                    method, self.path, self.headers.get("Content-Type"), raw, self.headers.get("Authorization")
                )
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_PATCH(self) -> None:
                self._serve("PATCH")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
