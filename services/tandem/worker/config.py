"""Configuration of one worker process (prefill or decode): frozen, validated once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from tandem.common.tracing import TracingConfig
from tandem.common.workers import WorkerRole
from tandem.engine.config import EngineConfig


@dataclass(frozen=True)
class WorkerConfig:
    """`host:port` is the gRPC bind address (port 0 picks a free port); `advertise_host`
    is what peers dial (default: `host`). `redis_url=None` runs without cluster state
    (a worker driven directly, as in tests). Times are seconds."""

    role: WorkerRole
    worker_id: str
    model_dir: Path
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    metrics_port: int | None = None
    redis_url: str | None = None
    cluster: str = "default"
    heartbeat_ttl_s: float = 5.0
    lease_ttl_s: float = 30.0
    inbox_size: int = 1024
    kv_transport: str = "grpc"
    transfer_timeout_s: float = 10.0
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    tracing: TracingConfig = field(default_factory=TracingConfig)

    def __post_init__(self) -> None:
        if not self.worker_id or len(self.worker_id) > 128:
            raise ValueError("worker_id must have 1 to 128 characters")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(f"host must be an IP address or 'localhost', got {self.host!r}") from None
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        for name in ("heartbeat_ttl_s", "lease_ttl_s", "transfer_timeout_s", "request_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.inbox_size < 1:
            raise ValueError(f"inbox_size must be >= 1, got {self.inbox_size}")
        if self.kv_transport not in ("grpc", "torch"):
            raise ValueError(f"kv_transport must be 'grpc' or 'torch', got {self.kv_transport!r}")

    @property
    def advertised(self) -> str:
        return self.advertise_host or self.host
