"""Hand-off seconds of one prompt's KV between two in-process engines over the gRPC transport
(the `quantization` bench section's hand-off rows: bf16 against fp8 KV).

Each (source, dest) engine pair: the source prefills the prompt and holds its blocks under a
lease; its servicer serves them on its own grpc.aio server on loopback, and one receiver
transport pulls the prompt's full blocks into the dest engine's blocks, round after round.
A pull of a 2000-token prompt on the bench model moves only 2-4 MiB in a few ms, so its fixed
costs and the machine's load weigh on each one: the pairs take turns pull by pull (in reverse
order every other round), the first rounds (cold channels, buffers and threads) are not kept,
and callers report medians with their spread.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from tandem.common.kv_handle import KVHandle
from tandem.engine import Engine, SamplingParams
from tandem.engine.outputs import HeldKV
from tandem.kvtransfer.base import create_transport
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVER_OPTIONS
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import KVTransferServicer
from tandem.kvtransfer.leases import LeaseTable

HANDOFF_WARMUP = 3  # rounds of pulls not kept


@dataclass(frozen=True)
class HandOff:
    """Seconds of the measured pulls of one KV dtype (warm-up excluded) and the bytes of each."""

    bytes_moved: int
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def percentile(self, q: int) -> float:
        """The q-th percentile (1..99) of `seconds`."""
        return statistics.quantiles(self.seconds, n=100, method="inclusive")[q - 1]


def handoff_seconds(
    pairs: dict[str, tuple[Engine, Engine]], prompt: Sequence[int], rounds: int, warmup: int = HANDOFF_WARMUP
) -> dict[str, HandOff]:
    """For each (source, dest) engine pair: prefill `prompt` on the source and hold its blocks
    under a lease. Then `warmup + rounds` rounds, each one pull per pair of the prompt's full
    blocks into the dest's blocks over the gRPC transport on loopback (source servicers and
    receiver in this process, as tests/integration/test_kvtransfer.py runs them): pack,
    chunking, xxh64 checksums, the socket and unpack. The pairs take turns pull by pull, in
    the reverse order every other round, so that all see the same machine load; the first
    `warmup` rounds are not kept."""
    held, stores = {}, {}
    for name, (source, dest) in pairs.items():
        source.add_request("handoff", prompt, SamplingParams(max_tokens=2, temperature=0.0), hand_off=True)
        while "handoff" not in source.held:
            source.step()
        held[name] = source.held["handoff"]
        stores[name] = (KVBlockStore(source.kv_caches, source.kv_layout), KVBlockStore(dest.kv_caches, dest.kv_layout))
    block_size = {name: source.config.block_size for name, (source, _) in pairs.items()}
    src_ids = {name: held[name].block_ids[: len(prompt) // block_size[name]] for name in pairs}
    seconds = asyncio.run(_grpc_pulls(stores, held, src_ids, rounds, warmup))
    for source, _ in pairs.values():
        source.release_held("handoff")
    return {name: HandOff(len(src_ids[name]) * stores[name][0].bytes_per_block, seconds[name]) for name in pairs}


async def _grpc_pulls(
    stores: dict[str, tuple[KVBlockStore, KVBlockStore]],
    held: dict[str, HeldKV],
    src_ids: dict[str, tuple[int, ...]],
    rounds: int,
    warmup: int,
) -> dict[str, list[float]]:
    leases = {name: LeaseTable(on_free=lambda _request_id: None) for name in stores}
    servicers = {name: KVTransferServicer(src, leases[name], KVTransferConfig()) for name, (src, _) in stores.items()}
    servers, addresses = [], {}
    for name, servicer in servicers.items():
        server = grpc.aio.server(options=SERVER_OPTIONS)
        servicer.register(server)
        addresses[name] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        servers.append(server)
    transport = create_transport("grpc")
    seconds: dict[str, list[float]] = {name: [] for name in stores}
    names = list(stores)
    try:
        for i in range(warmup + rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                src, dst = stores[name]
                kv = held[name]
                grant = leases[name].grant(f"handoff-{i}", kv, 30.0)
                handle = KVHandle(
                    f"handoff-{i}", "source", addresses[name], kv.block_ids, kv.num_tokens, src.layout,
                    kv.block_hashes, time.time() + 30.0, grant.secret,
                )  # fmt: skip
                ids = src_ids[name]
                started = time.perf_counter()
                await transport.pull(handle, ids, tuple(range(len(ids))), dst, 60.0)
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - started)
                await transport.release(handle, 10.0)
    finally:
        await transport.close()
        for server in servers:
            await server.stop(grace=None)
        for servicer in servicers.values():
            servicer.close()
    return seconds
