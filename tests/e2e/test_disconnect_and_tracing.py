"""A client that goes away mid-request leaves every pool free within 2 s; one OpenTelemetry
trace id covers the gateway, prefill and decode spans of a request."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import Cluster, gateway_metric
from tests.e2e.test_gateway_errors import post
from tests.integration.workers import worker_health


def _open_request(url: str, body: dict) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    raw = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
    )
    return sock


def test_streaming_disconnect_frees_everything(cluster: Cluster, gateway: ChildProcess) -> None:
    body = {
        "model": cluster.model_dir.name,
        "prompt": list(range(10, 90)),
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    sock = _open_request(gateway.address, body)
    received = b""
    while received.count(b"data: ") < 5:
        chunk = sock.recv(65536)
        assert chunk, "the stream ended early"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    cluster.assert_drained(timeout_s=2.0)
    deadline = time.monotonic() + 2
    while gateway_metric(gateway, "tandem_client_disconnects_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway_metric(gateway, "tandem_client_disconnects_total") >= 1


def test_non_streaming_disconnect_frees_everything(cluster: Cluster, gateway: ChildProcess) -> None:
    body = {
        "model": cluster.model_dir.name,
        "prompt": list(range(100, 180)),
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
    }
    sock = _open_request(gateway.address, body)
    busy_seen = False
    deadline = time.monotonic() + 10
    while not busy_seen and time.monotonic() < deadline:  # wait until a decoder runs it
        busy_seen = any(worker_health(w).running for w in cluster.decode)
        time.sleep(0.02)
    assert busy_seen
    sock.close()
    cluster.assert_drained(timeout_s=2.0)


def _spans(path) -> list[dict]:
    """The complete span lines written so far: the workers append to the file while the test
    polls it, so a last line without its newline is still being written and is left for the
    next poll (reading it raced in one clean-clone run)."""
    complete, _, _ = path.read_text().rpartition("\n")
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def test_one_trace_across_gateway_prefill_decode(cluster: Cluster, gateway: ChildProcess) -> None:
    body = json.dumps(
        {
            "model": cluster.model_dir.name,
            "messages": [{"role": "user", "content": "trace me, please"}],
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()
    status, _, got = post(gateway.address, "/v1/chat/completions", body)
    assert status == 200, got
    request_id = got["id"]
    wanted = {
        "gateway",
        "route",
        "prefill",
        "prefill.queue",
        "prefill.compute",
        "kv.pull",
        "decode",
        "decode.admit",
        "decode.stream",
    }
    deadline = time.monotonic() + 5
    while True:
        spans = _spans(cluster.trace_file)
        roots = [s for s in spans if s["name"] == "gateway" and s["attributes"].get("tandem.request_id") == request_id]
        trace_id = roots[0]["trace_id"] if roots else None
        mine = [s for s in spans if s["trace_id"] == trace_id]
        if {s["name"] for s in mine} >= wanted or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(roots) == 1
    by_name = {s["name"]: s for s in mine}
    assert {s["name"] for s in mine} >= wanted
    assert by_name["gateway"]["service_name"] == "tandem-gateway"
    assert by_name["prefill"]["service_name"] == "tandem-prefill"
    assert by_name["decode"]["service_name"] == "tandem-decode"
    root = by_name["gateway"]["span_id"]
    assert by_name["route"]["parent_span_id"] == root
    assert by_name["prefill"]["parent_span_id"] == root
    assert by_name["decode"]["parent_span_id"] == root
    assert by_name["prefill.compute"]["parent_span_id"] == by_name["prefill"]["span_id"]
    assert by_name["kv.pull"]["parent_span_id"] == by_name["decode"]["span_id"]
    assert by_name["gateway"]["attributes"]["gen_ai.usage.output_tokens"] == 6
    assert by_name["gateway"]["attributes"]["gen_ai.operation.name"] == "chat"
