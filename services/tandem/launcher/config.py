"""Configuration of a local cluster (`tandem up`), frozen and validated once, and the command
lines it turns into. The argv builders are pure so that tests can read them."""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tandem.autoscaler.config import AutoscalerConfig
from tandem.common.workers import WorkerRole

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")  # same rule as cluster_state's names
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
KV_TRANSPORTS = ("grpc", "torch")
MAX_WORKERS = 64
API_KEYS_ENV = "TANDEM_API_KEYS"  # read by `tandem gateway`, comma-separated
WORKER_HOST = "127.0.0.1"  # internal services bind loopback (DESIGN section 8)


def _check_host(name: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{name} must be an IP address or 'localhost', got {host!r}") from None


def _check_positive(**values: int | float | None) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class TracingFlags:
    """OpenTelemetry flags handed unchanged to every child (`--otel-exporter`, `--otel-endpoint`,
    `--otel-file`); the children validate their meaning. None: flag not given."""

    exporter: str | None = None
    endpoint: str | None = None
    file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("exporter", "endpoint"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"--otel-{name} must be a non-empty string, got {value!r}")

    def argv(self) -> list[str]:
        args: list[str] = []
        if self.exporter is not None:
            args += ["--otel-exporter", self.exporter]
        if self.endpoint is not None:
            args += ["--otel-endpoint", self.endpoint]
        if self.file is not None:
            args += ["--otel-file", str(self.file)]
        return args


@dataclass(frozen=True)
class LocalClusterConfig:
    """One gateway, `num_prefill` prefill and `num_decode` decode workers, and Redis, as local
    processes. `num_prefill=0` is colocated serving: decode workers prefill locally.
    `model_dir=None` serves the generated tiny model; `redis_url=None` starts a private
    redis-server. `host:port` is the gateway's public address (port 0: a free one); workers
    always bind 127.0.0.1 on free ports. Times are seconds. `autoscale` (None: fixed pools)
    lets the autoscaler resize both pools between its bounds, starting from the given sizes."""

    num_prefill: int = 1
    num_decode: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    model_dir: Path | None = None
    redis_url: str | None = None
    cluster: str = "default"
    policy: str | None = None
    local_prefill_max_tokens: int | None = None
    kv_cache_mib: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    kv_transport: str = "grpc"
    api_keys: tuple[str, ...] = ()
    tracing: TracingFlags = field(default_factory=TracingFlags)
    ready_timeout_s: float = 180.0
    drain_timeout_s: float = 30.0
    gateway_stop_timeout_s: float = 10.0
    autoscale: AutoscalerConfig | None = None

    def __post_init__(self) -> None:
        for name, low in (("num_prefill", 0), ("num_decode", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.num_prefill + self.num_decode > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} workers on one machine, got {self.num_prefill + self.num_decode}")
        _check_host("host", self.host)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise ValueError(f"model_dir {self.model_dir} is not a directory")
        if self.redis_url is not None and not self.redis_url.startswith(_REDIS_SCHEMES):
            raise ValueError(f"redis_url must start with one of {_REDIS_SCHEMES}, got {self.redis_url!r}")
        if not isinstance(self.cluster, str) or not _NAME_RE.match(self.cluster):
            raise ValueError(f"cluster must be 1-128 chars of [A-Za-z0-9_.-], got {self.cluster!r}")
        if self.policy is not None and not _NAME_RE.match(self.policy):
            raise ValueError(f"policy must be a policy name, got {self.policy!r}")
        if self.local_prefill_max_tokens is not None and (
            isinstance(self.local_prefill_max_tokens, bool) or self.local_prefill_max_tokens < 0
        ):
            raise ValueError(f"local_prefill_max_tokens must be >= 0, got {self.local_prefill_max_tokens!r}")
        _check_positive(
            kv_cache_mib=self.kv_cache_mib,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            ready_timeout_s=self.ready_timeout_s,
            drain_timeout_s=self.drain_timeout_s,
            gateway_stop_timeout_s=self.gateway_stop_timeout_s,
        )
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        if not isinstance(self.api_keys, tuple) or any(
            not isinstance(key, str) or not key or any(c.isspace() or c == "," for c in key) for key in self.api_keys
        ):
            raise ValueError("api_keys must be a tuple of non-empty strings without spaces or commas")
        if not isinstance(self.tracing, TracingFlags):
            raise ValueError("tracing must be a TracingFlags")
        if self.autoscale is not None:
            self._check_autoscale(self.autoscale)

    def _check_autoscale(self, autoscale: AutoscalerConfig) -> None:
        if not isinstance(autoscale, AutoscalerConfig):
            raise ValueError(f"autoscale must be an AutoscalerConfig, got {autoscale!r}")
        for name, count, pool in (
            ("prefill", self.num_prefill, autoscale.prefill),
            ("decode", self.num_decode, autoscale.decode),
        ):
            if not pool.min_replicas <= count <= pool.max_replicas:
                raise ValueError(
                    f"the {name} pool starts with {count} workers, outside its autoscaling "
                    f"bounds [{pool.min_replicas}, {pool.max_replicas}]"
                )
        if autoscale.prefill.max_replicas + autoscale.decode.max_replicas > MAX_WORKERS:
            raise ValueError(
                f"at most {MAX_WORKERS} workers on one machine; the autoscaling maxima allow "
                f"{autoscale.prefill.max_replicas + autoscale.decode.max_replicas}"
            )

    @property
    def num_workers(self) -> int:
        return self.num_prefill + self.num_decode

    def threads_per_worker(self, cpu_count: int | None) -> int:
        """The host's cores divided among the workers (DESIGN section 6b), at least 1. With
        autoscaling, among the most workers the pools may grow to."""
        scale = self.autoscale
        most = self.num_workers if scale is None else scale.prefill.max_replicas + scale.decode.max_replicas
        return max(1, (cpu_count or 1) // most)

    def worker_ids(self) -> list[tuple[WorkerRole, str]]:
        """(role, worker id) of every worker, decode first: `decode-0`, ..., `prefill-0`, ..."""
        return [(WorkerRole.DECODE, f"decode-{i}") for i in range(self.num_decode)] + [
            (WorkerRole.PREFILL, f"prefill-{i}") for i in range(self.num_prefill)
        ]

    def worker_argv(
        self,
        role: WorkerRole,
        worker_id: str,
        model_dir: Path,
        redis_url: str,
        num_threads: int,
        host: str = WORKER_HOST,
    ) -> list[str]:
        """The command line of one worker, bound to `host` (a Ray worker: its node's IP)."""
        argv = [
            sys.executable,
            "-m",
            "tandem",
            role.value,
            "--model",
            str(model_dir),
            "--worker-id",
            worker_id,
            "--host",
            host,
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--redis",
            redis_url,
            "--cluster",
            self.cluster,
            "--num-threads",
            str(num_threads),
            "--kv-transport",
            self.kv_transport,
            "--drain-timeout-s",
            str(self.drain_timeout_s),
        ]
        if self.kv_cache_mib is not None:
            argv += ["--kv-cache-mib", str(self.kv_cache_mib)]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        return argv + self.tracing.argv()

    def gateway_argv(self, model_dir: Path, redis_url: str) -> list[str]:
        """The command line of the gateway."""
        argv = [
            sys.executable,
            "-m",
            "tandem",
            "gateway",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--model",
            str(model_dir),
            "--redis",
            redis_url,
            "--cluster",
            self.cluster,
        ]
        if self.policy is not None:
            argv += ["--policy", self.policy]
        if self.local_prefill_max_tokens is not None:
            argv += ["--local-prefill-max-tokens", str(self.local_prefill_max_tokens)]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        return argv + self.tracing.argv()

    def gateway_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The gateway's environment: `base` plus the API keys in `TANDEM_API_KEYS` (in the
        environment, not on the command line, where every local user could read them)."""
        env = dict(base)
        env.pop(API_KEYS_ENV, None)
        if self.api_keys:
            env[API_KEYS_ENV] = ",".join(self.api_keys)
        return env
