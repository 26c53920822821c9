"""A KV source process for the same-host tests: a random KV cache, one lease, and a grpc.aio
server with the gRPC and same-host source servicers (SameHostTransport.add_source).

argv: LAYOUT NUM_BLOCKS SHM_DIR HOST_ID [hang] [pool]. With `hang`, packing a segment never
ends once the segment exists (so that a test can kill the source mid-transfer). With `pool` the
cache is a shared pool file in SHM_DIR, as a CPU prefill worker's (engine.kv_cache.allocate_shared);
with both, hashing the pool for a pull prints {"event": "hashing"} and never ends. Prints one JSON
line {"address", "lease_secret", "pid"} and serves until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading

import grpc
import torch

from tandem.common.layout import KVLayout
from tandem.engine.kv_cache import allocate_shared
from tandem.engine.outputs import HeldKV
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVER_OPTIONS
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import GrpcTransport
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.same_host import SameHostTransport
from tandem.kvtransfer.shm_chunks import HEADER_BYTES, ChunkPlan
from tandem.kvtransfer.shm_source import ShmKVServicer
from tandem.loadtest.bench.kv_source import random_kv_caches, synthetic_block_hashes


def hang_after_packing(self: ShmKVServicer, plan: ChunkPlan, segment_view: torch.Tensor) -> int:
    self.store.pack(plan.ids, out=segment_view[HEADER_BYTES : HEADER_BYTES + plan.size_bytes])  # never published
    print(json.dumps({"event": "packing"}), flush=True)
    threading.Event().wait()  # until killed
    return 0


def hang_hashing(self: ShmKVServicer, request_id: str, block_ids: tuple[int, ...]) -> int:
    print(json.dumps({"event": "hashing"}), flush=True)
    threading.Event().wait()  # until killed
    return 0


async def main(layout_text: str, num_blocks: int, shm_dir: str, host_id: str, hang: bool, pool: bool) -> None:
    layout = KVLayout.parse(layout_text)
    caches = random_kv_caches(layout, num_blocks, 1)
    if pool:
        shared = allocate_shared(shm_dir, tuple(caches[0].shape), caches[0].dtype, len(caches))
        for into, cache in zip(shared, caches, strict=True):
            into.copy_(cache)
        caches = shared
    store = KVBlockStore(caches, layout)
    leases = LeaseTable(on_free=lambda request_id: None)
    blocks = tuple(range(num_blocks))
    grant = leases.grant("req", HeldKV(blocks, num_blocks * layout.block_size, synthetic_block_hashes(blocks)), 60.0)
    if hang:
        ShmKVServicer.pack_into = hang_after_packing  # type: ignore[method-assign]
        ShmKVServicer.hash_pool = hang_hashing  # type: ignore[method-assign]
    config = KVTransferConfig(shm_dir=shm_dir, host_id=host_id)
    transport = SameHostTransport(GrpcTransport(config), config)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    transport.add_source(server, store, leases)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ready = {"address": f"127.0.0.1:{port}", "lease_secret": grant.secret.hex(), "pid": os.getpid()}
    print(json.dumps(ready), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    flags = set(sys.argv[5:])
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], "hang" in flags, "pool" in flags))
