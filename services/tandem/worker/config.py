"""Configuration of one worker process (prefill or decode): frozen, validated once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from tandem.common.plane_auth import PlaneAuth
from tandem.common.tracing import TracingConfig
from tandem.common.workers import WorkerRole, check_name
from tandem.engine.config import EngineConfig
from tandem.kvtransfer.config import KVTransferConfig


@dataclass(frozen=True)
class WorkerConfig:
    """`host:port` is the gRPC bind address (port 0 picks a free port); `advertise_host`
    is what peers dial (default: `host`). `redis_url=None` runs without cluster state
    (a worker driven directly, as in tests). Times are seconds. The KV transport's
    `bind_host` is set by the worker to its advertised host. The flags of `tandem prefill` and
    `tandem decode` are generated from these fields (`tandem.common.options`). `plane` is the
    internal plane's authentication (`tandem.common.plane_auth`): its token is read by the
    command, and a worker without one refuses to start unless `--insecure-no-auth`."""

    role: WorkerRole = field(metadata={"no_flag": "the command: tandem prefill | tandem decode"})
    worker_id: str = field(metadata={"required": False, "help": "default: {role}-{port}"})
    model_dir: Path = field(
        metadata={"flag": "model", "required": False, "help": "local HF model directory (default: tiny model)"}
    )
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = field(
        default=None,
        metadata={
            "help": "the model name of its metrics' `model_name` label, as the gateway serves it "
            "(default: the model directory's name, as the gateway's)"
        },
    )
    host: str = field(default="127.0.0.1", metadata={"help": "bind address of the gRPC server"})
    port: int = field(default=0, metadata={"help": "gRPC port (0: pick a free one)"})
    advertise_host: str | None = field(default=None, metadata={"help": "address peers dial (default: --host)"})
    metrics_port: int | None = field(default=None, metadata={"help": "serve Prometheus /metrics here"})
    redis_url: str | None = field(
        default=None,
        metadata={"flag": "redis", "help": "Redis URL of the cluster state (default: $TANDEM_REDIS_URL)"},
    )
    cluster: str = field(default="default", metadata={"help": "cluster name (Redis key prefix)"})
    heartbeat_ttl_s: float = field(default=5.0, metadata={"help": "life of the worker's Redis entry"})
    lease_ttl_s: float = field(default=30.0, metadata={"help": "how long a finished prompt's blocks stay pinned"})
    inbox_size: int = field(default=1024, metadata={"help": "requests waiting for the step loop (more: busy)"})
    max_waiting: int = field(
        default=256,
        metadata={
            "help": "requests waiting for a batch slot (queued, pulling KV or pulled); one more sheds a "
            "less important queued request (larger priority) or is refused busy (RESOURCE_EXHAUSTED)"
        },
    )
    kv_transfer: KVTransferConfig = field(
        default_factory=KVTransferConfig,
        metadata={"skip": ("bind_host",)},  # the worker's advertised host
    )
    request_timeout_s: float = field(default=600.0, metadata={"help": "bound on one request's life"})
    drain_timeout_s: float = field(default=30.0, metadata={"help": "bound on the drain at SIGTERM"})
    tracing: TracingConfig = field(default_factory=TracingConfig)
    plane: PlaneAuth = field(default_factory=PlaneAuth)

    def __post_init__(self) -> None:
        check_name("worker_id", self.worker_id)  # the rule its Redis registration applies
        check_name("cluster", self.cluster)
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(f"host must be an IP address or 'localhost', got {self.host!r}") from None
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        for name in ("heartbeat_ttl_s", "lease_ttl_s", "request_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("inbox_size", "max_waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def advertised(self) -> str:
        return self.advertise_host or self.host
