"""A stand-alone KV source process over random blocks, for `tandem bench kv` and the tests.

It plays a prefill worker without a model: a KV cache filled from a seed (so the parent can
rebuild the same bytes), one lease over the blocks, and a grpc.aio server bound to the given
host that hosts the transport's source servicer (`--transport torch,tcp`: each one's), built
with the real worker's gRPC server options. `--device cuda` keeps the cache on the GPU (device
0), as a prefill worker there does.
With `--host-id H` it also serves same-host pulls through shared memory (the transport
wrapped as a worker wraps it, `kvtransfer.same_host`, host id H); a CPU cache then lives in a
shared pool file, as a prefill worker's with `--kv-shm` (engine.kv_cache.allocate_shared), so
that receivers copy the blocks straight out of it.
With `--raw-tcp` it also serves a raw TCP baseline: each 8-byte little-endian size read from a
connection is answered with that many bytes from a preallocated buffer.

Protocol with the parent, the launcher's (`tandem.launcher.processes.ChildProcess`): the child
prints one JSON line `{"event": "ready", "address": "<host>:<grpc_port>", "raw_tcp_port": N,
"lease_secret": "<hex>"}` on stdout (N is 0 without `--raw-tcp`; the lease's secret, which
every pull must present, reaches the parent that way, as a prefill worker's reaches a decode
worker in the KV handle) and runs until SIGTERM or SIGINT (the harness also has the kernel send
it SIGTERM when the parent dies), then stops its server and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
import threading

import grpc
import torch

from tandem.common.layout import KVLayout
from tandem.common.plane_auth import TOKEN_ENV, ClusterToken, PlaneAuth, server_interceptors
from tandem.engine.kv_cache import allocate_shared
from tandem.engine.outputs import HeldKV
from tandem.kvtransfer.base import create_transport
from tandem.kvtransfer.block_store import KVBlockStore, torch_dtype
from tandem.kvtransfer.channels import SERVER_OPTIONS
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.same_host import with_same_host

LEASE_TTL_S = 3600.0


def random_kv_caches(
    layout: KVLayout, num_blocks: int, seed: int, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Per layer `[2, num_blocks, block_size, kv_heads, head_dim]` on `device`, the same for a
    given seed in every process on the same device: drawn by that device's own generator (on
    CUDA, Philox on the GPU: seconds faster than drawing hundreds of MiB on the host; the same
    bytes in two processes on one GPU, not across CPU and GPU)."""
    target = torch.device(device)
    generator = torch.Generator(device=target).manual_seed(seed)
    shape = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    dtype = torch_dtype(layout.kv_dtype)  # the cache's elements: the model's dtype or FP8
    return [torch.randn(shape, generator=generator, device=target).to(dtype) for _ in range(layout.num_layers)]


def synthetic_block_hashes(block_ids: tuple[int, ...]) -> tuple[int, ...]:
    """The hashes this source's lease records for its blocks (a bench source holds no prompt):
    a receiver's handle must carry the same ones, or the source refuses the pull."""
    return tuple(0xB10C_0000_0000 + b for b in block_ids)


def source_env(token: ClusterToken) -> dict[str, str]:
    """The source process's environment: ours plus the cluster token it requires."""
    return {**os.environ, TOKEN_ENV: token.secret}


def source_args(
    layout: KVLayout,
    num_blocks: int,
    seed: int,
    transport: str,
    request_id: str,
    raw_tcp: bool = False,
    host: str = "127.0.0.1",
    device: str = "cpu",
    host_id: str = "",
) -> list[str]:
    """The command line a parent uses to start this module (`python -m ...`)."""
    args = [
        sys.executable,
        "-m",
        "tandem.loadtest.bench.kv_source",
        "--layout",
        layout.describe(),
        "--num-blocks",
        str(num_blocks),
        "--seed",
        str(seed),
        "--transport",
        transport,
        "--request-id",
        request_id,
        "--host",
        host,
        "--device",
        device,
    ]
    return args + (["--raw-tcp"] if raw_tcp else []) + (["--host-id", host_id] if host_id else [])


def _serve_raw_tcp(listener: socket.socket, payload: memoryview) -> None:
    """Thread: answer size requests with bytes of `payload` (the raw TCP baseline)."""
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (header := conn.recv(8, socket.MSG_WAITALL)) and len(header) == 8:
                size = min(int.from_bytes(header, "little"), len(payload))
                conn.sendall(payload[:size])


async def _main(args: argparse.Namespace) -> None:
    layout = KVLayout.parse(args.layout)
    caches = random_kv_caches(layout, args.num_blocks, args.seed, args.device)
    if args.host_id and args.device == "cpu":  # allocated as a prefill worker's, then filled
        shared = allocate_shared(KVTransferConfig().shm_dir, tuple(caches[0].shape), caches[0].dtype, len(caches))
        for into, cache in zip(shared, caches, strict=True):
            into.copy_(cache)
        caches = shared
    store = KVBlockStore(caches, layout)
    leases = LeaseTable(on_free=lambda request_id: None)
    plane = PlaneAuth().resolve(os.environ)  # the cluster token in TANDEM_CLUSTER_TOKEN (`source_env`)
    plane.require("the KV source")
    first, *others = args.transport.split(",")
    config = KVTransferConfig(
        transport=first, bind_host=args.host, token=plane.token, shm=bool(args.host_id), host_id=args.host_id
    )
    transports = [with_same_host(create_transport(first, config), config)]
    transports += [create_transport(name, dataclasses.replace(config, transport=name)) for name in others]
    # the prefill worker's server, as deployed: the same options and token check
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=server_interceptors(plane))
    for transport in transports:  # PullKV and ReleaseKV: the first one's
        transport.add_source(server, store, leases)
    # granted once the transports serve, as a prefill worker grants its leases: a source that
    # hashes each lease's blocks at grant (block_digests.py) does so here, not in a pull
    blocks = tuple(range(args.num_blocks))
    grant = leases.grant(
        args.request_id,
        HeldKV(blocks, args.num_blocks * layout.block_size, synthetic_block_hashes(blocks)),
        LEASE_TTL_S,
    )
    port = server.add_insecure_port(f"{args.host}:0")
    await server.start()
    raw_port = 0
    if args.raw_tcp:
        listener = socket.create_server((args.host, 0))
        raw_port = listener.getsockname()[1]
        payload = memoryview(bytearray(args.num_blocks * store.bytes_per_block))
        threading.Thread(target=_serve_raw_tcp, args=(listener, payload), daemon=True).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    ready = {
        "event": "ready",
        "address": f"{args.host}:{port}",
        "raw_tcp_port": raw_port,
        "lease_secret": grant.secret.hex(),
    }
    print(json.dumps(ready), flush=True)
    await stop.wait()
    await server.stop(grace=None)
    for transport in transports:
        await transport.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", required=True, help="KVLayout.describe() string")
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transport", default="grpc", help="source servicers to serve, comma-separated")
    parser.add_argument("--request-id", default="bench")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--raw-tcp", action="store_true")
    parser.add_argument("--host-id", default="", help="serve same-host (shared memory) pulls as this host id")
    parser.add_argument("--device", default="cpu", help="where the KV cache lives: cpu, cuda (device 0)")
    parser.add_argument("--num-threads", type=int, default=1)
    parsed = parser.parse_args()
    torch.set_num_threads(parsed.num_threads)
    asyncio.run(_main(parsed))
