"""A benchmark cluster: Redis, workers and a gateway as local processes, each pinned to a core.

`tandem up` divides the cores among its workers but does not pin them; a benchmark that
compares layouts must, or it measures the OS scheduler (DESIGN.md section 6b). Every process
here starts under `taskset -c CPU`, so all of its threads stay on that core from the first
instruction, and each worker gets one torch thread.

Lifecycle: `BenchCluster.start(spec)` spawns Redis, the workers, then the gateway, waits until
each printed its ready line and the gateway's /metrics shows every worker, and returns the
cluster; `stop()` stops the gateway, then the workers, then Redis, by pid. Use it as a context
manager so a failed measurement still stops everything.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from services.common.embedded_redis import EmbeddedRedis
from services.launcher.processes import ChildProcess, wait_all_ready

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its role (`prefill` or `decode`), the core it runs on, and extra flags."""

    role: str
    cpu: int
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"worker role must be prefill or decode, got {self.role!r}")


@dataclass(frozen=True)
class ClusterSpec:
    """The processes of one benchmark cluster. `gateway_cpu` also hosts the load generator."""

    model_dir: Path
    workers: tuple[WorkerSpec, ...]
    gateway_cpu: int
    policy: str = "prefix_aware"
    local_prefill_max_tokens: int = 256
    kv_cache_mib: int = 256

    def __post_init__(self) -> None:
        if not any(w.role == "decode" for w in self.workers):
            raise ValueError("a cluster needs at least one decode worker")


def available_cpus() -> tuple[int, ...]:
    """The cores this process may run on, in order."""
    return tuple(sorted(os.sched_getaffinity(0)))


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """`argv` run under `taskset -c cpu` (unpinned if taskset is missing: a stated limitation)."""
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu), *argv] if taskset else argv


@dataclass
class BenchCluster:
    """A started cluster (see the module docstring). `url` is the gateway's base URL."""

    spec: ClusterSpec
    redis: EmbeddedRedis
    children: list[ChildProcess] = field(default_factory=list)
    url: str = ""
    worker_addresses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, spec: ClusterSpec, name: str = "bench") -> BenchCluster:
        cluster = cls(spec, EmbeddedRedis.start())
        try:
            cluster._start_processes(name)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_processes(self, name: str) -> None:
        python = [sys.executable, "-m", "services"]
        spec = self.spec
        workers = []
        for i, worker in enumerate(spec.workers):
            worker_id = f"{name}-{worker.role}-{i}"
            argv = [*python, worker.role, "--model", str(spec.model_dir), "--worker-id", worker_id, "--port", "0",
                    "--redis", self.redis.url, "--num-threads", "1", "--kv-cache-mib", str(spec.kv_cache_mib),
                    *worker.extra_args]
            child = ChildProcess.spawn(worker_id, pinned(worker.cpu, argv), forward=False)
            self.children.append(child)
            workers.append(child)
        wait_all_ready(workers, READY_TIMEOUT_S)
        for child in workers:
            self.worker_addresses[child.name] = child.ready["address"]
        argv = [*python, "gateway", "--model", str(spec.model_dir), "--redis", self.redis.url, "--port", "0",
                "--policy", spec.policy, "--local-prefill-max-tokens", str(spec.local_prefill_max_tokens)]
        gateway = ChildProcess.spawn(f"{name}-gateway", pinned(spec.gateway_cpu, argv), forward=False)
        self.children.append(gateway)
        self.url = gateway.wait_ready(READY_TIMEOUT_S)["address"]
        expected = {role: sum(w.role == role for w in spec.workers) for role in ("prefill", "decode")}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self.pool_sizes() != expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway sees pools {self.pool_sizes()}, expected {expected}")
            time.sleep(0.1)

    @property
    def model(self) -> str:
        return self.spec.model_dir.name

    def metrics(self) -> dict[str, float]:
        """The gateway's Prometheus samples, keyed `name{label=value,...}` (labels sorted)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def pool_sizes(self) -> dict[str, int]:
        try:
            samples = self.metrics()
        except OSError:
            return {}
        return {pool: int(samples.get(f"tandem_workers{{pool={pool}}}", -1)) for pool in ("prefill", "decode")}

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(STOP_TIMEOUT_S)
        self.children.clear()
        self.redis.stop()

    def __enter__(self) -> BenchCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
