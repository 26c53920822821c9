"""The scale-down drain from outside: `Worker.Drain`, `tandem drain` and grpc.health.v1.

What a Kubernetes preStop hook or an actuator sees: the worker leaves Redis at once, refuses
new work, reports NOT_SERVING for readiness but stays live, finishes its sequence exactly,
keeps a held lease until the decoder releases it, and only then reports idle.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.common.cluster_state import ClusterState
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.engine import Engine, SamplingParams
from tandem.launcher.processes import ChildProcess
from tandem.worker.drain import DrainError, drain_worker
from tests.conftest import random_prompts
from tests.integration.workers import (
    REPO_ROOT,
    cluster_token,
    decode_stream,
    prefill,
    release_kv,
    start_worker,
    worker_channel,
    worker_health,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=128)


def _health(worker: ChildProcess, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(worker_channel(worker))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _tandem_drain(address: str, timeout_s: float) -> tuple[int, dict, str]:
    done = subprocess.run(
        [sys.executable, "-m", "tandem", "drain", "--address", address, "--timeout-s", str(timeout_s)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


def test_drain_rpc_finishes_the_stream_and_leaves_routing(
    tiny_model_dir: Path, reference: Engine, redis_server
) -> None:
    state = ClusterState(redis.Redis.from_url(redis_server.url), "default")
    d = start_worker("decode", tiny_model_dir, "--redis", redis_server.url, worker_id="d-drain-rpc")
    try:
        assert (_health(d, ""), _health(d, "tandem.v1.Worker")) == (SERVING, SERVING)
        assert state.get_worker("d-drain-rpc") is not None
        (prompt,) = random_prompts([30], reference.model_config.vocab_size, seed=35)
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        stream = decode_stream(d, "drain-rpc", prompt, params)
        tokens = list(next(stream).token_ids)

        first = pb_grpc.WorkerStub(worker_channel(d)).Drain(pb.DrainRequest(), timeout=5)
        assert (first.idle, first.waiting, first.running, first.held_leases) == (False, 0, 1, 0)
        assert state.get_worker("d-drain-rpc") is None  # left the routing set at once
        assert (_health(d, ""), _health(d, "tandem.v1.Worker")) == (SERVING, NOT_SERVING)
        with pytest.raises(grpc.RpcError) as err:
            list(decode_stream(d, "late", prompt, params))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        tokens += [t for delta in stream for t in delta.token_ids]
        assert tokens == list(reference.generate([prompt], params)[0].token_ids)
        progress = drain_worker(d.address, timeout_s=10.0, token=cluster_token())
        assert (progress.idle, progress.waiting, progress.running, progress.held_leases) == (True, 0, 0, 0)
        h = worker_health(d)
        assert (h.draining, h.free_blocks) == (True, h.total_blocks)
        assert state.get_worker("d-drain-rpc") is None  # the stopped heartbeat never re-registers
        assert d.stop(10) == 0
    finally:
        d.kill()


def test_drain_deadline_ends_an_unfinished_stream_as_draining(tiny_model_dir: Path, reference: Engine) -> None:
    """SIGTERM with a stream that cannot finish within the drain deadline: the stream sends
    what it has, then ends UNAVAILABLE naming the drain (gateways resume it elsewhere); the
    worker aborts the sequence and exits 0."""
    d = start_worker("decode", tiny_model_dir, "--drain-timeout-s", "1", worker_id="d-drain-deadline")
    try:
        (prompt,) = random_prompts([30], reference.model_config.vocab_size, seed=37)
        params = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
        stream = decode_stream(d, "deadline", prompt, params)
        tokens = list(next(stream).token_ids)
        d.terminate()
        with pytest.raises(grpc.RpcError) as err:
            for delta in stream:
                tokens += delta.token_ids
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == (
            "worker d-drain-deadline is draining: its drain deadline (1.0 s) passed before the request finished"
        )
        assert 1 <= len(tokens) < params.max_tokens
        expected = reference.generate(
            [prompt], SamplingParams(max_tokens=len(tokens), temperature=0.0, ignore_eos=True)
        )
        assert tokens == list(expected[0].token_ids)
        assert d.stop(10) == 0
    finally:
        d.kill()


def test_tandem_drain_waits_for_held_leases(tiny_model_dir: Path, reference: Engine) -> None:
    p = start_worker("prefill", tiny_model_dir, "--lease-ttl-s", "60", worker_id="p-drain-cli")
    try:
        (prompt,) = random_prompts([40], reference.model_config.vocab_size, seed=36)
        first = prefill(p, "held", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        assert first.HasField("handle")

        code, out, _ = _tandem_drain(p.address, timeout_s=0.5)
        assert code == 1
        assert (out["event"], out["idle"], out["held_leases"], out["running"]) == ("drain_timeout", False, 1, 0)

        assert release_kv(p, first.handle) is True
        code, out, _ = _tandem_drain(p.address, timeout_s=10)
        assert code == 0
        assert (out["event"], out["idle"], out["held_leases"], out["waiting"], out["running"]) == (
            "drained",
            True,
            0,
            0,
            0,
        )
        h = worker_health(p)
        assert h.free_blocks == h.total_blocks
        assert p.stop(10) == 0
    finally:
        p.kill()


def test_drain_of_an_unreachable_worker_is_a_clear_error() -> None:
    from tandem.common.embedded_redis import free_port

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(DrainError, match=f"Drain on {address} failed: UNAVAILABLE"):
        drain_worker(address, timeout_s=1.0)
    code, out, stderr = _tandem_drain(address, timeout_s=1.0)
    assert (code, out) == (1, {})
    assert f"tandem: error: Drain on {address} failed: UNAVAILABLE" in stderr
    with pytest.raises(ValueError, match="host:port"):
        drain_worker("nohost", timeout_s=1.0)
