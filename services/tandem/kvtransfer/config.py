"""Configuration of the KV hand-off, shared by the prefill (source) and decode (receiver) sides.

Frozen and validated once (STYLE.md): the worker's config loader builds one `KVTransferConfig`
and hands it to `create_transport`; nothing changes it afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
MAX_CHUNK_BYTES = 4 * MiB  # DESIGN.md section 4: KV moves in chunks of 1 to 4 MiB
MIN_CHUNK_BYTES = 1 * MiB


@dataclass(frozen=True)
class KVTransferConfig:
    transport: str = "grpc"  # registered name: "grpc" or "torch" (services/tandem/kvtransfer/base.py)
    max_chunk_bytes: int = MAX_CHUNK_BYTES  # gRPC stream chunk size asked of the source
    pull_timeout_s: float = 30.0  # default bound of one whole pull, when the caller gives none
    connect_timeout_s: float = 10.0  # torch pair formation (TCPStore join + process group)
    bind_host: str = "127.0.0.1"  # torch transport: where this worker's TCPStore and gloo listen
    max_inflight_sends: int = 8  # torch source: transfers packed and waiting for their receiver
    max_pairs: int = 64  # torch: process-group pairs kept per worker (least recently used go)
    max_staging_bytes: int = 256 * MiB  # idle reusable host buffers kept per transport or servicer
    max_blocks_per_pull: int = 65536  # a peer asking for more is refused before any allocation

    def __post_init__(self) -> None:
        if not MIN_CHUNK_BYTES <= self.max_chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(
                f"max_chunk_bytes must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {self.max_chunk_bytes}"
            )
        for name in ("pull_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_inflight_sends", "max_pairs", "max_blocks_per_pull"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_staging_bytes < 0:
            raise ValueError(f"max_staging_bytes must be >= 0, got {self.max_staging_bytes}")
        if not self.bind_host or self.bind_host in ("0.0.0.0", "::"):
            raise ValueError(
                f"bind_host must be an address of this worker that peers can reach (peers connect to "
                f"it for torch pairs; DESIGN.md section 8), got {self.bind_host!r}"
            )
