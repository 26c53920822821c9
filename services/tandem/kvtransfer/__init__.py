"""The KV hand-off from prefill to decode workers (DESIGN.md sections 2 and 4).

Public API: `create_transport(name, config)` returns a `KVTransport` ("grpc" or "torch");
`KVBlockStore` wraps a worker's KV cache; `LeaseTable` pins a prefill worker's held blocks;
The KV handle itself is a shared noun: `tandem.common.kv_handle.KVHandle`.
The transport modules themselves are imported on demand by `create_transport`.
"""

from tandem.kvtransfer.base import (
    FailureReason,
    KVTransferError,
    KVTransport,
    TransferStats,
    create_transport,
)
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import server_options
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.leases import LeaseCounters, LeaseError, LeaseTable

__all__ = [
    "FailureReason",
    "KVBlockStore",
    "KVTransferConfig",
    "KVTransferError",
    "KVTransport",
    "LeaseCounters",
    "LeaseError",
    "LeaseTable",
    "TransferStats",
    "create_transport",
    "server_options",
]
