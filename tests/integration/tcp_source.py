"""A KV source process for the tcp transport's kill tests: a random KV cache (seed 1), one lease
"req" over every block, and a grpc.aio server with the tcp source servicer.

argv: LAYOUT NUM_BLOCKS [hang | hang-second]. With `hang`, a send stops after the first half
of the blocks' bytes, prints {"event": "sending"} and never ends (so that a test can kill the
source mid-transfer); with `hang-second`, only the second send does (the first one leaves a kept
connection, which the second pull's request comes in band on). Prints one JSON line
{"address", "lease_secret", "pid"} and serves until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading

import grpc

from tandem.common.layout import KVLayout
from tandem.engine.outputs import HeldKV
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVER_OPTIONS
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.tcp_source import TcpKVServicer
from tandem.loadtest.bench.kv_source import random_kv_caches, synthetic_block_hashes


class HangingServicer(TcpKVServicer):
    sends_before_hang = 0

    def send_blocks(
        self, sock: socket.socket, views: list[memoryview], deadline_s: float, committed: object = None
    ) -> int:
        if self.sends_before_hang > 0:
            self.sends_before_hang -= 1
            return super().send_blocks(sock, views, deadline_s, committed)  # type: ignore[arg-type]
        flat = b"".join(bytes(v) for v in views)
        sock.sendall(flat[: len(flat) // 2])
        print(json.dumps({"event": "sending"}), flush=True)
        threading.Event().wait()  # until killed
        return 0


async def main(layout_text: str, num_blocks: int, mode: str) -> None:
    layout = KVLayout.parse(layout_text)
    store = KVBlockStore(random_kv_caches(layout, num_blocks, 1), layout)
    leases = LeaseTable(on_free=lambda request_id: None)
    blocks = tuple(range(num_blocks))
    grant = leases.grant("req", HeldKV(blocks, num_blocks * layout.block_size, synthetic_block_hashes(blocks)), 60.0)
    servicer = (HangingServicer if mode else TcpKVServicer)(store, leases, KVTransferConfig(transport="tcp"))
    if isinstance(servicer, HangingServicer) and mode == "hang-second":
        servicer.sends_before_hang = 1
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ready = {"address": f"127.0.0.1:{port}", "lease_secret": grant.secret.hex(), "pid": os.getpid()}
    print(json.dumps(ready), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    mode = sys.argv[3] if sys.argv[3:] else ""
    if mode not in ("", "hang", "hang-second"):
        raise SystemExit(f"unknown mode {mode!r}")
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), mode))
