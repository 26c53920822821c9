"""Real worker processes for integration tests: started on free loopback ports, stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tandem.common import codec
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.engine import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]


def spawn_until_ready(cmd: list[str], name: str, timeout_s: float) -> tuple[subprocess.Popen, dict, list[str]]:
    """Start `cmd` in the repo and wait (bounded) for its JSON ready line; kill it by pid and
    raise with its stderr tail if none arrives."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr_lines: list[str] = []
    threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True).start()
    ready: dict = {}
    reader = threading.Thread(target=lambda: ready.update(json.loads(proc.stdout.readline() or "{}")), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not ready.get("address"):
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"{name} did not become ready:\n{''.join(stderr_lines[-30:])}")
    return proc, ready, stderr_lines


@dataclass
class WorkerProcess:
    role: str
    proc: subprocess.Popen
    address: str
    metrics_port: int | None
    worker_id: str
    stderr_lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, role: str, model_dir: Path, *extra: str, worker_id: str, timeout_s: float = 60.0) -> WorkerProcess:
        cmd = [
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
        proc, ready, stderr_lines = spawn_until_ready(cmd, f"{role} worker", timeout_s)
        return cls(role, proc, ready["address"], ready["metrics_port"], worker_id, stderr_lines)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self) -> pb_grpc.WorkerStub:
        return pb_grpc.WorkerStub(self.channel())

    def health(self) -> pb.HealthResponse:
        return self.stub().Health(pb.HealthRequest(), timeout=5)

    def metric(self, name: str) -> float:
        """Sum of every sample of `name` on this worker's /metrics."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def request_pb(request_id: str, prompt: list[int], params: SamplingParams) -> pb.Request:
    return codec.request_to_proto(codec.Request(request_id, tuple(prompt), params))


def prefill(worker: WorkerProcess, request_id: str, prompt: list[int], params: SamplingParams) -> pb.PrefillResponse:
    return worker.stub().Prefill(pb.PrefillRequest(request=request_pb(request_id, prompt, params)), timeout=60)


def decode_stream(
    worker: WorkerProcess,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    first: pb.PrefillResponse | None = None,
) -> Iterator[pb.DecodeDelta]:
    msg = pb.DecodeRequest(request=request_pb(request_id, prompt, params))
    if first is not None:
        msg.first_token = first.first_token
        if first.HasField("handle"):
            msg.handle.CopyFrom(first.handle)
    return worker.stub().Decode(msg, timeout=60)


def disaggregated(
    prefill_w: WorkerProcess, decode_w: WorkerProcess, request_id: str, prompt: list[int], params: SamplingParams
) -> tuple[list[int], list[pb.DecodeDelta]]:
    """Prefill on one worker, decode on the other; returns all tokens and the deltas."""
    first = prefill(prefill_w, request_id, prompt, params)
    if first.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
        return [first.first_token], []
    deltas = list(decode_stream(decode_w, request_id, prompt, params, first))
    return [first.first_token] + [t for d in deltas for t in d.token_ids], deltas
