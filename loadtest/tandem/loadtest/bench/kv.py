"""`tandem bench kv`: KV hand-off throughput of each transport against raw loopback TCP.

One run: a source process (loadtest/tandem/loadtest/bench/kv_source.py, bound to 127.0.0.1) holds
the KV of a long prompt under a lease and also serves a raw TCP baseline; this process is the
receiver. Rounds interleave raw TCP, the gRPC transport and the torch transport, so that all
three see the same machine load, and the medians are compared. Every transport round is a
whole pull (source pack, transfer, checksums, receiver unpack) into a real destination cache;
raw TCP is only `sendall` from a ready buffer into `recv_into` a reused one. The destination
blocks are checked against the source's bytes once per transport.

Shape of the transfer: the source's blocks are one run (a fresh prompt), the destination's
are runs of 64 blocks in shuffled order (a pool after some churn). Each side uses one torch
thread, as `tandem up` gives each worker its share of a small host's cores.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.kvtransfer.base import create_transport
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.config import KVTransferConfig
from tandem.launcher.processes import ChildProcess
from tandem.loadtest.bench.kv_source import random_kv_caches, source_args

BENCH_LAYOUT = KVLayout("llama", num_layers=16, num_kv_heads=4, head_dim=64, dtype="bfloat16", block_size=16)
PROMPT_TOKENS = 4096  # 256 blocks of 256 KiB: 64 MiB of KV
REQUEST_ID = "bench-kv"
SEED = 7
SETTLE_S = 0.1  # quiet time before each measured transfer: the previous one's frees and threads settle
BEST_GOAL, GRPC_GOAL = 0.70, 0.40  # fractions of raw TCP
SOURCE_READY_TIMEOUT_S, SOURCE_STOP_TIMEOUT_S = 60.0, 10.0


@dataclass(frozen=True)
class BenchResult:
    name: str
    mb_per_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.mb_per_s)


@dataclass(frozen=True)
class KVBenchReport:
    """Medians per path (`raw tcp`, `grpc`, `torch`), the bytes of one pull, and whether every
    transport's destination blocks equalled the source's."""

    results: dict[str, BenchResult]
    size_bytes: int
    num_blocks: int
    bytes_per_block: int
    layout: KVLayout
    exact: bool

    def ratio(self, name: str) -> float:
        return self.results[name].median / self.results["raw tcp"].median

    @property
    def best(self) -> tuple[str, float]:
        name = max((n for n in self.results if n != "raw tcp"), key=self.ratio)
        return name, self.ratio(name)


def measure_kv(rounds: int = 9, prompt_tokens: int = PROMPT_TOKENS) -> KVBenchReport:
    """Run the interleaved rounds (see the module docstring) and return the medians."""
    torch.set_num_threads(1)  # one core for the receiver, one for the source (2-core hosts)
    layout = BENCH_LAYOUT
    num_blocks = -(-prompt_tokens // layout.block_size)
    argv = source_args(layout, num_blocks, SEED, "torch", REQUEST_ID, raw_tcp=True)
    source = ChildProcess.start("kv-source", argv, SOURCE_READY_TIMEOUT_S, forward=False)
    try:
        assert source.ready is not None  # start() returns a ready child
        raw_port = int(source.ready["raw_tcp_port"])
        return asyncio.run(_bench(layout, num_blocks, source.address, raw_port, rounds))
    finally:
        source.stop(SOURCE_STOP_TIMEOUT_S)


def run_kv_bench(out: Callable[[str], None] = print, rounds: int = 9, prompt_tokens: int = PROMPT_TOKENS) -> int:
    """Run the benchmark and print one line per path; 1 if a transfer was not exact."""
    report = measure_kv(rounds, prompt_tokens)
    _report(report, out)
    return 0 if report.exact else 1


async def _bench(layout: KVLayout, num_blocks: int, address: str, raw_port: int, rounds: int) -> KVBenchReport:
    source = KVBlockStore(random_kv_caches(layout, num_blocks, SEED), layout)
    dest = KVBlockStore(random_kv_caches(layout, num_blocks, SEED + 1), layout)
    size_bytes = num_blocks * dest.bytes_per_block
    handle = KVHandle(
        REQUEST_ID,
        "bench-source",
        address,
        tuple(range(num_blocks)),
        num_blocks * layout.block_size,
        layout,
        (),
        time.time() + 3600,
    )
    dst_ids = _pool_like_ids(num_blocks)
    transports = {name: create_transport(name, KVTransferConfig(transport=name)) for name in ("grpc", "torch")}
    raw = socket.create_connection(("127.0.0.1", raw_port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = bytearray(size_bytes)
    results = {name: BenchResult(name, []) for name in ("raw tcp", *transports)}
    exact = True
    try:
        for round_index in range(rounds + 1):  # round 0 warms up channels, pairs and buffers
            await asyncio.sleep(SETTLE_S)
            seconds = await asyncio.to_thread(_raw_tcp_once, raw, received)
            if round_index:
                results["raw tcp"].mb_per_s.append(size_bytes / seconds / 1e6)
            for name, transport in transports.items():
                await asyncio.sleep(SETTLE_S)
                stats = await transport.pull(handle, handle.block_ids, dst_ids, dest, timeout_s=60.0)
                if round_index == 0 and not _exact(source, dest, dst_ids):
                    exact = False
                if round_index:
                    results[name].mb_per_s.append(stats.mb_per_s)
        await transports["grpc"].release(handle, timeout_s=5.0)
    finally:
        raw.close()
        for transport in transports.values():
            await transport.close()
    return KVBenchReport(results, size_bytes, num_blocks, dest.bytes_per_block, layout, exact)


def _pool_like_ids(num_blocks: int, run_blocks: int = 64) -> tuple[int, ...]:
    """Destination ids as a block pool after some churn hands them out: runs of consecutive
    ids in shuffled order (the source's are one run, as for a fresh prompt)."""
    runs = [tuple(range(start, min(start + run_blocks, num_blocks))) for start in range(0, num_blocks, run_blocks)]
    order = torch.randperm(len(runs), generator=torch.Generator().manual_seed(SEED)).tolist()
    return tuple(block for i in order for block in runs[i])


def _raw_tcp_once(conn: socket.socket, into: bytearray) -> float:
    """Ask the source for len(into) bytes and receive them; seconds from ask to last byte."""
    view = memoryview(into)
    started = time.perf_counter()
    conn.sendall(len(into).to_bytes(8, "little"))
    got = 0
    while got < len(into):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("raw TCP source closed the connection")
        got += n
    return time.perf_counter() - started


def _exact(source: KVBlockStore, dest: KVBlockStore, dst_ids: tuple[int, ...]) -> bool:
    index = torch.tensor(dst_ids)
    return all(torch.equal(s, d[:, index]) for s, d in zip(source.kv_caches, dest.kv_caches))


def _report(report: KVBenchReport, out: Callable[[str], None]) -> None:
    lay, results = report.layout, report.results
    out(
        f"kv bench: {report.size_bytes / 2**20:.1f} MiB per pull ({report.num_blocks} blocks x "
        f"{report.bytes_per_block // 1024} KiB; {lay.num_layers} layers, {lay.num_kv_heads} KV heads x "
        f"{lay.head_dim}, {lay.dtype}), source process on 127.0.0.1, median of "
        f"{len(results['raw tcp'].mb_per_s)} interleaved rounds"
    )
    if not report.exact:
        out("  a transport's destination blocks differ from the source")
    for name, result in results.items():
        spread = f"[{min(result.mb_per_s):.0f}..{max(result.mb_per_s):.0f}]"
        ratio = "" if name == "raw tcp" else f"  {report.ratio(name):.2f} of raw tcp"
        out(f"  {name:8s} {result.median:8.0f} MB/s {spread:>14s}{ratio}")
    best = report.best[1]
    grpc_ratio = report.ratio("grpc")
    out(
        f"  goals: best transport >= {BEST_GOAL:.2f} of raw tcp: {best:.3f} "
        f"({'met' if best >= BEST_GOAL else 'missed'}); grpc >= {GRPC_GOAL:.2f}: {grpc_ratio:.3f} "
        f"({'met' if grpc_ratio >= GRPC_GOAL else 'missed'})"
    )
