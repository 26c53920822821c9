"""A real cluster for end-to-end tests: embedded Redis, worker processes and gateway processes,
all started with the launcher's harness (`ChildProcess`) on free loopback ports and all
stopped by pid."""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tandem.common.embedded_redis import EmbeddedRedis
from tandem.launcher.processes import ChildProcess
from tests.integration.workers import REPO_ROOT, STOP_TIMEOUT_S, metric_sum, start_worker, worker_health

HEARTBEAT_TTL_S = 2.0
GATEWAY_STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL after this


def start_gateway(
    model_dir: Path, redis_url: str, *extra: str, timeout_s: float = 60.0, wait_ready: bool = True
) -> ChildProcess:
    """A gateway process (its `address` is its base URL), returned once it printed its ready
    line and, with `wait_ready`, once `GET /ready` answers 200 (a decode worker is routable)."""
    argv = [
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
    gateway = ChildProcess.start("gateway", argv, timeout_s, cwd=REPO_ROOT, forward=False)
    if wait_ready:
        try:
            wait_gateway_ready(gateway, timeout_s)
        except RuntimeError:
            gateway.stop(GATEWAY_STOP_TIMEOUT_S)
            raise
    return gateway


def wait_gateway_ready(gateway: ChildProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(gateway.address + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway never became ready:\n{gateway.output_tail()}")


def gateway_metric(gateway: ChildProcess, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the gateway's /metrics whose labels include `labels`."""
    return metric_sum(gateway.address + "/metrics", name, **labels)


@dataclass
class Cluster:
    """The session's cluster; each worker's harness name is its worker id (`prefill-0`, ...)."""

    redis: EmbeddedRedis
    prefill: list[ChildProcess]
    decode: list[ChildProcess]
    model_dir: Path
    trace_file: Path

    @classmethod
    def start(
        cls,
        model_dir: Path,
        trace_file: Path,
        num_prefill: int = 2,
        num_decode: int = 2,
        heartbeat_ttl_s: float = HEARTBEAT_TTL_S,
    ) -> Cluster:
        """`heartbeat_ttl_s`: longer than any SIGSTOP a test gives a worker that must stay routable."""
        redis = EmbeddedRedis.start()
        common = (
            "--redis",
            redis.url,
            "--heartbeat-ttl-s",
            str(heartbeat_ttl_s),
            "--otel-exporter",
            "file",
            "--otel-file",
            str(trace_file),
        )
        workers: dict[str, list[ChildProcess]] = {"prefill": [], "decode": []}
        try:
            for role, count in (("prefill", num_prefill), ("decode", num_decode)):
                for i in range(count):
                    workers[role].append(start_worker(role, model_dir, *common, worker_id=f"{role}-{i}"))
        except BaseException:
            for w in [*workers["prefill"], *workers["decode"]]:
                w.stop(STOP_TIMEOUT_S)
            redis.stop()
            raise
        return cls(redis, workers["prefill"], workers["decode"], model_dir, trace_file)

    @property
    def workers(self) -> list[ChildProcess]:
        return [*self.prefill, *self.decode]

    def gateway(self, *extra: str) -> ChildProcess:
        """A gateway on this cluster, returned once its registry view holds every worker."""
        g = start_gateway(self.model_dir, self.redis.url, *extra)
        deadline = time.monotonic() + 10
        while gateway_metric(g, "tandem_workers") != len(self.workers):
            if time.monotonic() > deadline:
                g.stop(GATEWAY_STOP_TIMEOUT_S)
                raise RuntimeError(f"the gateway never saw all {len(self.workers)} workers")
            time.sleep(0.05)
        return g

    def assert_drained(self, timeout_s: float = 2.0) -> None:
        """Every pool fully free: nothing waiting or running, no lease, every block free."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = {w.name: worker_health(w) for w in self.workers}
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
            if w.is_running:
                os.kill(w.pid, signal.SIGCONT)  # a test may have frozen one
            w.stop(STOP_TIMEOUT_S)
        self.redis.stop()
