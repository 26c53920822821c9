"""Slow clients (issue 15, deliverable 6): a streaming client that stops reading holds only a
bounded buffer; once it has been full for the bound, its request is aborted and the decode
worker frees the sequence, while the client still holds its connection open; another
client's stream meanwhile completes as usual."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster, gateway_metric
from tests.integration.workers import wait_until, worker_metric

SLOW_CLIENT_TIMEOUT_S = 1.0
MAX_BUFFERED_EVENTS = 4


@pytest.fixture(scope="module")
def decoder(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    trace_file = tmp_path_factory.mktemp("slow") / "spans.jsonl"
    c = Cluster.start(tiny_model_dir, trace_file, num_prefill=0, num_decode=1)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def strict(decoder: Cluster) -> Iterator[ChildProcess]:
    g = decoder.gateway(
        "--max-buffered-events", str(MAX_BUFFERED_EVENTS), "--slow-client-timeout-s", str(SLOW_CLIENT_TIMEOUT_S)
    )
    try:
        yield g
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


def _stalled_stream(url: str, body: dict) -> socket.socket:
    """A streaming request from a client that never reads (a 4 KiB receive buffer)."""
    u = urlparse(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((u.hostname, u.port))
    raw = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
    )
    return sock


def _stream_tokens(url: str, body: dict) -> int:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return sum(len(json.loads(e)["choices"][0]["token_ids"]) for e in events[:-1])
    finally:
        conn.close()


def test_stopped_reader_is_aborted_and_does_not_stall_others(decoder: Cluster, strict: ChildProcess) -> None:
    model = decoder.model_dir.name
    worker = decoder.decode[0]
    stalled = _stalled_stream(
        strict.address,
        {
            "model": model,
            "prompt": list(range(10, 42)),
            "n": 8,  # about 10 MB of events: more than the kernel's socket buffers (4 MiB on loopback) absorb
            "max_tokens": 1900,
            "logprobs": 5,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        },
    )
    try:
        assert wait_until(lambda: worker_metric(worker, "vllm:num_requests_running") == 8, 30)
        # Another client streams to the end while the stalled one fills its buffers.
        start = time.monotonic()
        body = {"model": model, "prompt": [7, 8, 9], "max_tokens": 32, "ignore_eos": True, "stream": True}
        assert _stream_tokens(strict.address, {**body, "return_token_ids": True}) == 32
        assert time.monotonic() - start < 30
        # The stalled request is aborted once its buffer stayed full: the worker frees all 8
        # sequences, though the client still holds its connection.
        aborted = wait_until(lambda: gateway_metric(strict, "tandem_slow_client_aborts_total") == 1, 120)
        assert aborted, (
            gateway_metric(strict, "tandem_requests_total", endpoint="/v1/completions"),
            worker_metric(worker, "vllm:num_requests_running"),
        )
        assert wait_until(lambda: worker_metric(worker, "vllm:num_requests_running") == 0, 10)
        decoder.assert_drained(timeout_s=10.0)
        assert gateway_metric(strict, "tandem_admitted_requests") == 0
        assert gateway_metric(strict, "tandem_requests_total", endpoint="/v1/completions", status="408") == 1
        assert gateway_metric(strict, "tandem_requests_total", endpoint="/v1/completions", status="200") == 1
    finally:
        stalled.close()
    # Its connection's close changes nothing more: the request was counted once.
    time.sleep(0.5)
    assert gateway_metric(strict, "tandem_requests_total", endpoint="/v1/completions", status="408") == 1
    assert gateway_metric(strict, "tandem_client_disconnects_total") == 0
