"""A benchmark cluster: `tandem up`'s `LocalCluster` with every process pinned to a core.

`tandem up` divides the cores among its workers but does not pin them; a benchmark that
compares layouts must, or it measures the OS scheduler (DESIGN.md section 6b). So:
- each worker starts under `taskset -c CPU` (`ProcessPlacement` with `cpus`): all of its
  threads stay on that core from the first instruction; each gets one torch thread;
- while the cluster runs, this process's thread (the load generator) is pinned to
  `gateway_cpu`, and so are the gateway and Redis, which `LocalCluster` spawns from it and
  which inherit its affinity.

Lifecycle: `BenchCluster.start(spec)` pins this thread, then `LocalCluster.start()` (Redis,
workers, gateway; it returns once the gateway's /metrics counts every worker); `stop()` stops
them in reverse (by pid) and restores this thread's affinity. Use it as a context manager so a
failed measurement still stops everything.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

from tandem.common.plane_auth import ClusterToken
from tandem.engine.config import MiB
from tandem.gateway.admission import AdmissionConfig
from tandem.launcher.config import LocalClusterConfig, gateway_template, worker_template
from tandem.launcher.local import LocalCluster
from tandem.launcher.placement import ProcessPlacement

WORKER_THREADS = 1


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its role (`prefill` or `decode`) and the core it runs on."""

    role: str
    cpu: int

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"worker role must be prefill or decode, got {self.role!r}")


@dataclass(frozen=True)
class ClusterSpec:
    """The processes of one benchmark cluster. `gateway_cpu` also hosts Redis and the load generator."""

    model_dir: Path
    workers: tuple[WorkerSpec, ...]
    gateway_cpu: int
    policy: str = "prefix_aware"
    local_prefill_max_tokens: int = 256
    kv_cache_mib: int = 256
    admission: AdmissionConfig | None = None  # None: the gateway's defaults

    def __post_init__(self) -> None:
        if not any(w.role == "decode" for w in self.workers):
            raise ValueError("a cluster needs at least one decode worker")

    def config(self) -> LocalClusterConfig:
        count = {role: sum(w.role == role for w in self.workers) for role in ("prefill", "decode")}
        worker, gateway = worker_template(), gateway_template()
        scheduler = replace(
            gateway.scheduler, policy=self.policy, local_prefill_max_tokens=self.local_prefill_max_tokens
        )
        return LocalClusterConfig(
            num_prefill=count["prefill"],
            num_decode=count["decode"],
            model_dir=self.model_dir,
            worker=replace(worker, engine=replace(worker.engine, kv_cache_bytes=self.kv_cache_mib * MiB)),
            gateway=replace(gateway, port=0, scheduler=scheduler, admission=self.admission or gateway.admission),
        )

    def worker_cpus(self) -> dict[str, int]:
        """Core of each worker by the id `LocalCluster` gives it (`decode-0`, `prefill-1`, ...):
        the i-th worker of a role in `workers` is `<role>-i`."""
        cpus: dict[str, int] = {}
        for worker in self.workers:
            index = sum(name.startswith(worker.role + "-") for name in cpus)
            cpus[f"{worker.role}-{index}"] = worker.cpu
        return cpus


class BenchCluster:
    """A started cluster (see the module docstring). `url` is the gateway's base URL."""

    def __init__(self, spec: ClusterSpec, cluster: LocalCluster, own_cpus: set[int], sink: IO[str]) -> None:
        self.spec = spec
        self._cluster = cluster
        self._own_cpus = own_cpus
        self._sink = sink

    @classmethod
    def start(cls, spec: ClusterSpec) -> BenchCluster:
        config = spec.config()
        own_cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {spec.gateway_cpu})
        sink = open(os.devnull, "w")  # noqa: SIM115 - the children's output; closed by stop()
        placement = ProcessPlacement(config, sink, num_threads=WORKER_THREADS, cpus=spec.worker_cpus())
        cluster = cls(spec, LocalCluster(config, sink=sink, placement=placement), own_cpus, sink)
        try:
            cluster._cluster.start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def url(self) -> str:
        return self._cluster.endpoint

    @property
    def model(self) -> str:
        return self.spec.model_dir.name

    @property
    def token(self) -> ClusterToken | None:
        """The cluster token its workers require (the cluster generated it)."""
        return self._cluster.token

    @property
    def worker_addresses(self) -> dict[str, str]:
        """gRPC address of each worker, by worker id."""
        return {
            child.name: child.address
            for child in self._cluster.children()
            if child.name.startswith(("prefill-", "decode-")) and child.address
        }

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

    def stop(self) -> None:
        try:
            self._cluster.stop()
        finally:
            os.sched_setaffinity(0, self._own_cpus)
            self._sink.close()

    def __enter__(self) -> BenchCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
