"""The authenticated internal plane on real worker processes: every method of both roles,
without the cluster token and with a wrong one, ends UNAUTHENTICATED and changes nothing; the
standard health protocol stays open; a worker without a token refuses to start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.common import codec
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.plane_auth import MISSING_MESSAGE, TOKEN_ENV, WRONG_MESSAGE, ClusterToken
from tandem.engine import SamplingParams
from tandem.launcher.processes import ChildProcess
from tests.integration.workers import (
    REPO_ROOT,
    STOP_TIMEOUT_S,
    cluster_token,
    decode_stream,
    prefill,
    request_pb,
    start_worker,
    wait_until,
    worker_health,
    worker_metric,
    worker_stub,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = list(range(5, 45))  # 40 tokens: two full blocks and a partial one
WRONG = ClusterToken("not-the-cluster-token-0123456789")


@pytest.fixture(scope="module")
def workers(tiny_model_dir: Path) -> Iterator[tuple[ChildProcess, ChildProcess]]:
    p = start_worker("prefill", tiny_model_dir, worker_id="p-auth")
    d = start_worker("decode", tiny_model_dir, worker_id="d-auth")
    try:
        yield p, d
    finally:
        p.stop(STOP_TIMEOUT_S)
        d.stop(STOP_TIMEOUT_S)


def _requests(handle_request_id: str) -> dict[str, tuple[str, bytes, bool]]:
    """(service, a well-formed request, server streaming) of every method of a worker."""
    decode = pb.DecodeRequest(request=request_pb("auth-d", PROMPT, GREEDY))
    return {
        "Prefill": (
            "Worker",
            pb.PrefillRequest(request=request_pb("auth-p", PROMPT, GREEDY)).SerializeToString(),
            False,
        ),
        "Decode": ("Worker", decode.SerializeToString(), True),
        "Abort": ("Worker", pb.AbortRequest(request_id=handle_request_id).SerializeToString(), False),
        "Health": ("Worker", pb.HealthRequest().SerializeToString(), False),
        "Drain": ("Worker", pb.DrainRequest().SerializeToString(), False),
        "PullKV": (
            "KVTransfer",
            pb.PullKVRequest(request_id=handle_request_id, block_ids=[0], max_chunk_bytes=1 << 20).SerializeToString(),
            True,
        ),
        "ReleaseKV": ("KVTransfer", pb.ReleaseKVRequest(request_id=handle_request_id).SerializeToString(), False),
        "SendKV": (
            "KVTransfer",
            pb.SendKVRequest(
                request_id=handle_request_id, block_ids=[0], store_address="127.0.0.1:1", pair_id="x"
            ).SerializeToString(),
            False,
        ),
    }


def _call(address: str, service: str, method: str, raw: bytes, streaming: bool, token: ClusterToken | None) -> None:
    metadata = token.metadata() if token is not None else None
    with grpc.insecure_channel(address) as channel:
        path = f"/tandem.v1.{service}/{method}"
        if streaming:
            list(channel.unary_stream(path)(raw, timeout=10, metadata=metadata))
        else:
            channel.unary_unary(path)(raw, timeout=10, metadata=metadata)


@pytest.mark.parametrize("token", [None, WRONG], ids=["no-token", "wrong-token"])
def test_every_method_of_both_roles_refuses_a_call_without_the_token(
    workers: tuple[ChildProcess, ChildProcess], token: ClusterToken | None
) -> None:
    p, d = workers
    first = prefill(p, "auth-lease", PROMPT, GREEDY)  # a lease the refused calls name
    assert worker_health(p).held_leases == 1
    computed = {w.name: worker_metric(w, "tandem_prompt_tokens_computed_total") for w in (p, d)}
    for worker in (p, d):
        for method, (service, raw, streaming) in _requests("auth-lease").items():
            with pytest.raises(grpc.RpcError) as info:
                _call(worker.address, service, method, raw, streaming, token)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, (worker.name, method)
            assert info.value.details() == (MISSING_MESSAGE if token is None else WRONG_MESSAGE), (worker.name, method)
    # Nothing changed: no prompt ran, no drain began, the lease is still held.
    for worker in (p, d):
        health = worker_health(worker)
        assert (health.draining, health.waiting, health.running) == (False, 0, 0), worker.name
        assert worker_metric(worker, "tandem_prompt_tokens_computed_total") == computed[worker.name]
    assert worker_health(p).held_leases == 1
    # And the lease still serves its decode, which pulls and releases it.
    deltas = list(decode_stream(d, "auth-lease", PROMPT, GREEDY, first))
    assert sum(len(x.token_ids) for x in deltas) == GREEDY.max_tokens - 1
    assert wait_until(lambda: worker_health(p).held_leases == 0, 10.0)


def test_drain_and_abort_without_the_token_leave_the_stream_and_the_worker_serving(
    workers: tuple[ChildProcess, ChildProcess],
) -> None:
    _, d = workers
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    stream = decode_stream(d, "auth-long", PROMPT, params)
    first = next(stream)  # the sequence runs
    for token in (None, WRONG):
        for method, raw in (
            ("Abort", pb.AbortRequest(request_id="auth-long").SerializeToString()),
            ("Drain", pb.DrainRequest().SerializeToString()),
        ):
            with pytest.raises(grpc.RpcError) as info:
                _call(d.address, "Worker", method, raw, False, token)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    rest = list(stream)
    tokens = [t for delta in (first, *rest) for t in delta.token_ids]
    assert len(tokens) == params.max_tokens and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert worker_health(d).draining is False
    # With the token the call is heard: the request has finished, so nobody owns it any more and
    # the answer is the one an unknown id gets (common/ownership.py).
    with pytest.raises(grpc.RpcError) as info:
        worker_stub(d).Abort(codec.abort_request_to_proto("auth-long"), timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_grpc_health_stays_open_without_the_token(workers: tuple[ChildProcess, ChildProcess]) -> None:
    for worker in workers:
        with grpc.insecure_channel(worker.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tandem.v1.Worker"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_token_never_reaches_the_worker_logs(workers: tuple[ChildProcess, ChildProcess]) -> None:
    token = cluster_token().secret
    for worker in workers:
        assert token not in worker.output_tail() and WRONG.secret not in worker.output_tail()
        assert "refused" in worker.output_tail()  # the refusals above were logged, without a token


def _worker_argv(role: str, tiny_model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tandem", role, "--model", str(tiny_model_dir), "--kv-cache-mib", "8", *extra]


def test_a_worker_without_a_token_refuses_to_start(tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    result = subprocess.run(
        _worker_argv("decode", tiny_model_dir), env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "tandem: error: a worker needs the internal plane's cluster token: set TANDEM_CLUSTER_TOKEN or "
        "--cluster-token-file (`tandem up` generates one), or pass --insecure-no-auth to run without "
        "authentication on a trusted network"
    )
    short = {**env, TOKEN_ENV: "short"}
    result = subprocess.run(
        _worker_argv("prefill", tiny_model_dir), env=short, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"tandem: error: {TOKEN_ENV}: the cluster token must be at least 16 characters long"
    )


def test_a_token_file_and_the_insecure_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`--cluster-token-file` wins over the environment; `--insecure-no-auth` serves without."""
    token = ClusterToken.generate()
    path = tmp_path / "token"
    path.write_text(token.secret + "\n")
    worker = start_worker("decode", tiny_model_dir, "--cluster-token-file", str(path), worker_id="d-file")
    try:
        raw = pb.HealthRequest().SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            _call(worker.address, "Worker", "Health", raw, False, cluster_token())  # the environment's
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        _call(worker.address, "Worker", "Health", raw, False, token)
    finally:
        worker.stop(STOP_TIMEOUT_S)
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    argv = [*_worker_argv("decode", tiny_model_dir), "--insecure-no-auth", "--port", "0"]
    insecure = ChildProcess.start("d-insecure", argv, 60.0, env=env, cwd=REPO_ROOT, forward=False)
    try:
        _call(insecure.address, "Worker", "Health", pb.HealthRequest().SerializeToString(), False, None)
        assert "internal plane: NO authentication (--insecure-no-auth)" in insecure.output_tail()
    finally:
        insecure.stop(STOP_TIMEOUT_S)


def test_a_gateway_without_a_token_refuses_to_start(tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    argv = [sys.executable, "-m", "tandem", "gateway", "--model", str(tiny_model_dir), "--redis", "redis://127.0.0.1:1"]
    result = subprocess.run(argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "tandem: error: the gateway needs the internal plane's cluster token: set TANDEM_CLUSTER_TOKEN or "
        "--cluster-token-file (`tandem up` generates one), or pass --insecure-no-auth to run without "
        "authentication on a trusted network"
    )
