"""A real cluster for end-to-end tests: embedded Redis, worker processes and gateway processes,
all on free loopback ports and all stopped by pid."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tandem.common.embedded_redis import EmbeddedRedis
from tests.integration.workers import WorkerProcess, spawn_until_ready

HEARTBEAT_TTL_S = 2.0


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    url: str
    stderr_lines: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls, model_dir: Path, redis_url: str, *extra: str, timeout_s: float = 60.0, wait_ready: bool = True
    ) -> GatewayProcess:
        cmd = [
            sys.executable,
            "-m",
            "tandem",
            "gateway",
            "--model",
            str(model_dir),
            "--redis",
            redis_url,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *extra,
        ]
        proc, ready, stderr_lines = spawn_until_ready(cmd, "gateway", timeout_s)
        gateway = cls(proc, ready["address"], stderr_lines)
        if wait_ready:
            try:
                gateway.wait_ready(timeout_s)
            except RuntimeError:
                gateway.stop()
                raise
        return gateway

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway never became ready:\n{''.join(self.stderr_lines[-40:])}")

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if not (line.startswith(name + "{") or line.startswith(name + " ")):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@dataclass
class Cluster:
    redis: EmbeddedRedis
    prefill: list[WorkerProcess]
    decode: list[WorkerProcess]
    model_dir: Path
    trace_file: Path

    @classmethod
    def start(cls, model_dir: Path, trace_file: Path, num_prefill: int = 2, num_decode: int = 2) -> Cluster:
        redis = EmbeddedRedis.start()
        common = (
            "--redis",
            redis.url,
            "--heartbeat-ttl-s",
            str(HEARTBEAT_TTL_S),
            "--otel-exporter",
            "file",
            "--otel-file",
            str(trace_file),
        )
        workers: list[WorkerProcess] = []
        try:
            for role, count in (("prefill", num_prefill), ("decode", num_decode)):
                for i in range(count):
                    workers.append(WorkerProcess.start(role, model_dir, *common, worker_id=f"{role}-{i}"))
        except BaseException:
            for w in workers:
                w.stop()
            redis.stop()
            raise
        return cls(
            redis,
            [w for w in workers if w.role == "prefill"],
            [w for w in workers if w.role == "decode"],
            model_dir,
            trace_file,
        )

    @property
    def workers(self) -> list[WorkerProcess]:
        return [*self.prefill, *self.decode]

    def gateway(self, *extra: str) -> GatewayProcess:
        """A gateway on this cluster, returned once its registry view holds every worker."""
        g = GatewayProcess.start(self.model_dir, self.redis.url, *extra)
        deadline = time.monotonic() + 10
        while g.metric("tandem_workers") != len(self.workers):
            if time.monotonic() > deadline:
                g.stop()
                raise RuntimeError(f"the gateway never saw all {len(self.workers)} workers")
            time.sleep(0.05)
        return g

    def assert_drained(self, timeout_s: float = 2.0) -> None:
        """Every pool fully free: nothing waiting or running, no lease, every block free."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = {w.worker_id: w.health() for w in self.workers}
            busy = {
                wid: (h.waiting, h.running, h.held_leases, h.total_blocks - h.free_blocks)
                for wid, h in states.items()
                if h.waiting or h.running or h.held_leases or h.free_blocks != h.total_blocks
            }
            if not busy:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"pools not drained after {timeout_s} s: (waiting, running, leases, used blocks) = {busy}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)  # a test may have frozen one
            w.stop()
        self.redis.stop()
