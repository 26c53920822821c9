"""The KV hand-off from prefill to decode workers (DESIGN.md sections 2 and 4).

Public API: `create_transport(name, config)` returns a `KVTransport` ("grpc" or "torch");
`KVBlockStore` wraps a worker's KV cache; `LeaseTable` pins a prefill worker's held blocks;
`KVHandleInfo` and `handle_to_proto/handle_from_proto` carry the handle across gRPC.
The transport modules themselves are imported on demand by `create_transport`.
"""

from tandem.kvtransfer.base import (
    FailureReason,
    KVHandleInfo,
    KVTransferError,
    KVTransport,
    TransferStats,
    create_transport,
    handle_from_proto,
    handle_to_proto,
)
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import server_options
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.leases import LeaseCounters, LeaseError, LeaseTable

__all__ = [
    "FailureReason",
    "KVBlockStore",
    "KVHandleInfo",
    "KVTransferConfig",
    "KVTransferError",
    "KVTransport",
    "LeaseCounters",
    "LeaseError",
    "LeaseTable",
    "TransferStats",
    "create_transport",
    "handle_from_proto",
    "handle_to_proto",
    "server_options",
]
