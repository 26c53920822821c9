"""How workers and gateways answer `GET /metrics`: always the Prometheus text format 0.0.4.

Why not negotiate. prometheus_client (0.26) picks the format from the `Accept` header. A
Prometheus 2.x scrape asks for OpenMetrics first:
`application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,
text/plain;version=0.0.4;q=0.5,*/*;q=0.1` (2.42; 2.5x adds `escaping=` and the protobuf type).
For `version=1.0.0` the client's OpenMetrics writer keeps the colon in `# HELP`/`# TYPE` lines
but writes each *sample* name with underscores (`vllm_num_requests_running`), so Prometheus
stores `vllm_num_requests_running` and every vLLM dashboard query finds nothing. Its text 0.0.4
writer keeps `:` (legal in a Prometheus metric name) under every escaping, and Prometheus
accepts text 0.0.4 whatever it asked for (it parses by the response's `Content-Type`). So each
`/metrics` answers text 0.0.4, `Content-Type: text/plain; version=0.0.4; charset=utf-8`,
whatever the `Accept` header: `vllm:` names survive the scrape under every header Prometheus
sends. Counters appear with their `_total` suffix (`vllm:prompt_tokens_total`).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
METRICS_PATH = "/metrics"


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in the text format 0.0.4 (colons kept), and its content type."""
    return generate_latest(registry), CONTENT_TYPE


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[ThreadingHTTPServer, int]:
    """Serve `registry` at `GET /metrics` on (host, port) from a daemon thread (port 0: a free
    one). Returns the server (its owner may `shutdown()` it) and the bound port. Any other path
    is 404."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != METRICS_PATH:
                self.send_error(404, f"only {METRICS_PATH} is served here")
                return
            body, content_type = render(registry)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # one line per scrape on stderr would drown the worker's log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server, int(server.server_address[1])
