"""No silent failures (issue 15, deliverable 5): a decode worker frozen before its first token,
behind a gateway with a short decode idle timeout, on the local-prefill path. The client gets
a 503 with OpenAI's error shape and Retry-After before any header, streaming or not, never a
200 with zero tokens; the request metrics count each under 503; the pool drains once the
worker resumes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster, gateway_metric
from tests.e2e.test_gateway_errors import post

IDLE_TIMEOUT_S = 1.0
HEARTBEAT_TTL_S = 60.0  # the frozen worker stays registered: the failure is the stall, not a missing worker


@pytest.fixture(scope="module")
def lone_decoder(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One decode worker and no prefill pool: every request prefills locally."""
    trace_file = tmp_path_factory.mktemp("silent") / "spans.jsonl"
    c = Cluster.start(tiny_model_dir, trace_file, num_prefill=0, num_decode=1, heartbeat_ttl_s=HEARTBEAT_TTL_S)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def impatient(lone_decoder: Cluster) -> Iterator[ChildProcess]:
    g = lone_decoder.gateway("--decode-idle-timeout-s", str(IDLE_TIMEOUT_S))
    try:
        yield g
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


def _body(model: str, stream: bool) -> bytes:
    return json.dumps(
        {"model": model, "prompt": list(range(5, 40)), "max_tokens": 8, "temperature": 0, "stream": stream}
    ).encode()


def test_frozen_decoder_before_first_token_is_an_http_503(lone_decoder: Cluster, impatient: ChildProcess) -> None:
    model = lone_decoder.model_dir.name
    status, _, body = post(impatient.address, "/v1/completions", _body(model, stream=False))
    assert status == 200 and body["usage"]["completion_tokens"] == 8
    worker = lone_decoder.decode[0]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        answers = []
        for stream in (True, False):
            start = time.monotonic()
            answers.append(
                (*post(impatient.address, "/v1/completions", _body(model, stream)), time.monotonic() - start)
            )
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    for status, headers, body, elapsed_s in answers:
        assert status == 503, body
        assert headers["Retry-After"] == "1"
        assert headers["Content-Type"] == "application/json"
        assert body == {
            "error": {
                "message": "the generation failed before its first token: "
                f"decode worker decode-0 sent nothing for {IDLE_TIMEOUT_S} s",
                "type": "service_unavailable",
                "param": None,
                "code": None,
            }
        }
        assert IDLE_TIMEOUT_S <= elapsed_s < IDLE_TIMEOUT_S + 10
    assert gateway_metric(impatient, "tandem_requests_total", endpoint="/v1/completions", status="503") == 2
    assert gateway_metric(impatient, "tandem_requests_total", endpoint="/v1/completions", status="200") == 1
    lone_decoder.assert_drained(timeout_s=20.0)
