"""Real worker processes for integration tests, started with the launcher's harness
(`ChildProcess`) on free loopback ports and stopped by pid, and the client calls the tests make."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc

from tandem.common import codec, kv_codec
from tandem.common.ownership import owner_metadata
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.plane_auth import TOKEN_ENV, ClusterToken, sync_channel
from tandem.engine import SamplingParams
from tandem.launcher.processes import ChildProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 30.0  # SIGTERM, then SIGKILL after this


def start_worker(role: str, model_dir: Path, *extra: str, worker_id: str, timeout_s: float = 60.0) -> ChildProcess:
    """A `role` worker named `worker_id`, returned once its ready line arrived (its output is
    kept for `output_tail()`); stopped again, with its last output raised, if it never does."""
    argv = [
        sys.executable,
        "-m",
        "tandem",
        role,
        "--model",
        str(model_dir),
        "--worker-id",
        worker_id,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--num-threads",
        "1",
        "--kv-cache-mib",
        "8",
        *extra,
    ]
    return ChildProcess.start(worker_id, argv, timeout_s, cwd=REPO_ROOT, forward=False)


def cluster_token() -> ClusterToken:
    """The test session's cluster token (tests/conftest.py), which every child inherits."""
    return ClusterToken(os.environ[TOKEN_ENV])


def worker_channel(worker: ChildProcess) -> grpc.Channel:
    """A channel whose every call presents the session's cluster token."""
    return sync_channel(worker.address, cluster_token())


def worker_stub(worker: ChildProcess) -> pb_grpc.WorkerStub:
    return pb_grpc.WorkerStub(worker_channel(worker))


def worker_health(worker: ChildProcess) -> pb.HealthResponse:
    return worker_stub(worker).Health(codec.health_request_to_proto(), timeout=5)


def metrics_port(worker: ChildProcess) -> int:
    assert worker.ready is not None
    return int(worker.ready["metrics_port"])


def metric_sum(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` at the Prometheus endpoint `url` whose labels include `labels`."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def worker_metric(worker: ChildProcess, name: str) -> float:
    """Sum of every sample of `name` on this worker's /metrics."""
    return metric_sum(f"http://127.0.0.1:{metrics_port(worker)}/metrics", name)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def request_pb(request_id: str, prompt: list[int], params: SamplingParams) -> pb.Request:
    return codec.request_to_proto(codec.Request(request_id, tuple(prompt), params))


def _owned(owner: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata of a call made as the request's owner (`owner` secret), or of an anonymous one."""
    return (owner_metadata(owner),) if owner is not None else ()


def prefill(
    worker: ChildProcess, request_id: str, prompt: list[int], params: SamplingParams, owner: str | None = None
) -> pb.PrefillResponse:
    return worker_stub(worker).Prefill(
        pb.PrefillRequest(request=request_pb(request_id, prompt, params)), timeout=60, metadata=_owned(owner)
    )


def decode_stream(
    worker: ChildProcess,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    first: pb.PrefillResponse | None = None,
    owner: str | None = None,
) -> Iterator[pb.DecodeDelta]:
    msg = pb.DecodeRequest(request=request_pb(request_id, prompt, params))
    if first is not None:
        msg.first_token = first.first_token
        if first.HasField("handle"):
            msg.handle.CopyFrom(first.handle)
    return worker_stub(worker).Decode(msg, timeout=60, metadata=_owned(owner))


def abort(worker: ChildProcess, request_id: str, owner: str | None = None) -> bool:
    """Abort as the owner whose secret is `owner` (None: as a caller with no secret). Raises
    grpc.RpcError NOT_FOUND unless `owner` submitted a request `request_id` still live there."""
    return worker_stub(worker).Abort(codec.abort_request_to_proto(request_id), timeout=5, metadata=_owned(owner)).found


def release_kv(worker: ChildProcess, handle: pb.KVHandle, secret: bytes | None = None) -> bool:
    """ReleaseKV of `handle`'s lease on `worker`, with the handle's secret unless `secret` is given."""
    call = worker_channel(worker).unary_unary(
        f"/{kv_codec.KV_TRANSFER_SERVICE}/ReleaseKV",
        request_serializer=kv_codec.release_kv_request_to_bytes,
        response_deserializer=kv_codec.release_kv_response_from_bytes,
    )
    request = kv_codec.ReleaseKVRequest(handle.request_id, handle.lease_secret if secret is None else secret)
    return bool(call(request, timeout=5))


def disaggregated(
    prefill_w: ChildProcess, decode_w: ChildProcess, request_id: str, prompt: list[int], params: SamplingParams
) -> tuple[list[int], list[pb.DecodeDelta]]:
    """Prefill on one worker, decode on the other; returns all tokens and the deltas."""
    first = prefill(prefill_w, request_id, prompt, params)
    if first.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
        return [first.first_token], []
    deltas = list(decode_stream(decode_w, request_id, prompt, params, first))
    return [first.first_token] + [t for d in deltas for t in d.token_ids], deltas


def kv_stub(worker: ChildProcess) -> pb_grpc.KVTransferStub:
    return pb_grpc.KVTransferStub(worker_channel(worker))


def call_raw(worker: ChildProcess, method: str, payload: bytes, streaming: bool) -> tuple[grpc.StatusCode, str]:
    """Send `payload` as the request bytes of `method` (e.g. "/tandem.v1.Worker/Prefill");
    the call's final status code and details (the responses of a stream are read and dropped)."""
    channel = worker_channel(worker)
    try:
        if streaming:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            stream = call(payload, timeout=60)
            for _ in stream:
                pass
            return stream.code(), stream.details() or ""
        _, state = channel.unary_unary(method, request_serializer=None, response_deserializer=None).with_call(
            payload, timeout=60
        )
        return state.code(), state.details() or ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    finally:
        channel.close()
