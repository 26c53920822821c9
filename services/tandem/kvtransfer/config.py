"""Configuration of the KV hand-off, shared by the prefill (source) and decode (receiver) sides.

Frozen and validated once (STYLE.md): the worker's config loader builds one `KVTransferConfig`
and hands it to `create_transport`; nothing changes it afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.common.plane_auth import ClusterToken

MiB = 1024 * 1024
MAX_CHUNK_BYTES = 4 * MiB  # DESIGN.md section 4: KV moves in chunks of 1 to 4 MiB
MIN_CHUNK_BYTES = 1 * MiB


# The transport registry: name -> (module, class), imported on first use by
# `base.create_transport`. It lives here, with no imports, so that the config can check a name
# (and the CLI list the choices) without loading a transport.
TRANSPORTS: dict[str, tuple[str, str]] = {
    "grpc": ("tandem.kvtransfer.grpc_transport", "GrpcTransport"),
    "torch": ("tandem.kvtransfer.torch_transport", "TorchTransport"),
    "tcp": ("tandem.kvtransfer.tcp_transport", "TcpTransport"),
}


TRANSPORT_NAMES: tuple[str, ...] = tuple(sorted(TRANSPORTS))  # the `--kv-transport` choices


@dataclass(frozen=True)
class KVTransferConfig:
    transport: str = field(default="grpc", metadata={"flag": "kv-transport", "choices": TRANSPORT_NAMES})
    max_chunk_bytes: int = field(
        default=MAX_CHUNK_BYTES,
        metadata={"flag": "kv-max-chunk-bytes", "help": "gRPC stream chunk size asked of the source"},
    )
    pull_timeout_s: float = field(
        default=10.0, metadata={"flag": "transfer-timeout-s", "help": "bound on one KV pull or release"}
    )
    connect_timeout_s: float = field(
        default=10.0, metadata={"flag": "kv-connect-timeout-s", "help": "torch: bound on forming a process-group pair"}
    )
    bind_host: str = field(
        default="127.0.0.1",
        metadata={
            "flag": "kv-bind-host",
            "help": "torch: where the TCPStore and gloo listen; tcp: the KV data listener",
        },
    )
    tcp_port: int = field(
        default=0,
        metadata={"flag": "kv-tcp-port", "help": "tcp source: port of the KV data listener (0: any free one)"},
    )
    max_inflight_sends: int = field(
        default=8, metadata={"flag": "kv-max-inflight-sends", "help": "torch, tcp source: sends in flight"}
    )
    max_pairs: int = field(
        default=64,
        metadata={"flag": "kv-max-pairs", "help": "torch: process-group pairs kept (least recently used go)"},
    )
    max_staging_bytes: int = field(
        default=256 * MiB, metadata={"flag": "kv-max-staging-bytes", "help": "idle reusable host buffers kept"}
    )
    max_blocks_per_pull: int = field(
        default=65536, metadata={"flag": "kv-max-blocks-per-pull", "help": "a peer asking for more is refused"}
    )
    shm: bool = field(
        default=True,
        metadata={
            "flag": "kv-shm",
            "help": "same-host hand-off through shared memory when the source reports this host id "
            "(the network transport stays the fallback)",
        },
    )
    shm_dir: str = field(
        default="/dev/shm", metadata={"flag": "kv-shm-dir", "help": "where same-host KV segments live (tmpfs)"}
    )
    host_id: str = field(
        default="",
        metadata={
            "flag": "kv-host-id",
            "help": "this host's id for same-host hand-off (default: $TANDEM_HOST_ID, else boot id + hostname)",
        },
    )
    direct_min_run_bytes: int = field(
        default=256 * 1024,
        metadata={
            "flag": "kv-direct-min-run-bytes",
            "help": "torch receiver: a run of blocks this long per plane moves in place, without staging copies",
        },
    )
    token: ClusterToken | None = field(
        default=None, metadata={"no_flag": "the worker's cluster token, presented to peers (None: insecure plane)"}
    )

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORT_NAMES:
            raise ValueError(f"transport must be one of {TRANSPORT_NAMES}, got {self.transport!r}")
        if not MIN_CHUNK_BYTES <= self.max_chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(
                f"max_chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {self.max_chunk_bytes}"
            )
        for name in ("pull_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_inflight_sends", "max_pairs", "max_blocks_per_pull", "direct_min_run_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.shm_dir.startswith("/"):
            raise ValueError(f"shm_dir must be an absolute path, got {self.shm_dir!r}")
        if len(self.host_id) > 128:
            raise ValueError(f"host_id must have at most 128 characters, got {len(self.host_id)}")
        if not 0 <= self.tcp_port < 65536:
            raise ValueError(f"tcp_port must be in [0, 65535], got {self.tcp_port}")
        if self.max_staging_bytes < 0:
            raise ValueError(f"max_staging_bytes must be >= 0, got {self.max_staging_bytes}")
        if not self.bind_host or self.bind_host in ("0.0.0.0", "::"):
            raise ValueError(
                f"bind_host must be an address of this worker that peers can reach (peers connect to "
                f"it for torch pairs; DESIGN.md section 8), got {self.bind_host!r}"
            )
