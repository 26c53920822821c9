"""`tandem bench kv`: KV hand-off throughput of each transport against raw loopback TCP.

One run: a source process (loadtest/tandem/loadtest/bench/kv_source.py, bound to 127.0.0.1) holds
the KV of a long prompt under a lease and also serves a raw TCP baseline; this process is the
receiver. Rounds interleave raw TCP, the gRPC transport, the torch transport, the tcp
transport, the torch transport with every pull staged (its path before issue 20), the same-host
shared-memory transport (SHM: the source serves it under BENCH_HOST_ID with its cache in a shared
pool file, as a CPU prefill worker's; the receiver pulls with a handle that names that host and
copies the leased blocks straight out of that pool, hashing them; the source's chunk checksums
are combined from the per-block crc32c it took once when the lease was granted, as a prefill
worker does when a prompt finishes (kvtransfer/block_digests.py; the tcp transport's trailer
likewise): lease, both checksums and the copy into the shuffled blocks are measured, and
the grant-time hashing of the pull's blocks is timed separately, GRANT_DIGESTS) and an
in-process memcpy of the same bytes (MEMCPY: one `copy_` of a
uint8 tensor of the pull's size into another), so that all see the same machine load, and the
medians are compared. Every transport round is a whole pull (source
pack, transfer, checksums, receiver unpack) into a real destination cache; raw TCP is only
`sendall` from a ready buffer into `recv_into` a reused one. The destination blocks are
checked against the source's bytes once per transport (zeroed before that pull, so the check
proves that this transport wrote them).

Placement (`Placement`): raw TCP and the network transports run with every thread of the
source process on one core and every thread of this process on another, as two workers on
two hosts would. Left to the scheduler on a 2-core host, a pull's threads sometimes share one
core and sometimes migrate between the two, and the rounds of one path split into modes about
2x apart by chance (the tcp transport's took 20 or 40 ms in one run, where pinned apart they
took 18-26 ms and raw TCP's 24-30). The same-host path and the memcpy run unpinned, as a
same-host pair runs on its host's cores (the shm receiver copies and hashes on two threads),
beside a second raw TCP round run unpinned (RAW_SHARED): each path's ratio is to the raw TCP
measured in its own placement (`baseline`).

Shape of the transfer: the source's blocks are one run (a fresh prompt), the destination's
are runs of 64 blocks in shuffled order (a pool after some churn). Each side uses one torch
thread, as `tandem up` gives each worker its share of a small host's cores.

The GPU check's hand-off step (tandem.loadtest.gpu.step_handoff) reuses the pieces with both
caches on the GPU: `source_process` and `Receiver` take a device, and `measure_checksums` times
the transports' integrity checks over a pull's bytes where the blocks live.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import xxhash

from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.common.plane_auth import ClusterToken
from tandem.kvtransfer.base import KVTransport, TransferStats, create_transport
from tandem.kvtransfer.block_digests import digest_blocks
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import clamp_chunk_bytes
from tandem.kvtransfer.same_host import SameHostTransport
from tandem.kvtransfer.shm_pool_copy import planes
from tandem.kvtransfer.torch_pairs import host_bytes
from tandem.kvtransfer.torch_plan import plan_messages
from tandem.launcher.processes import ChildProcess
from tandem.loadtest.bench.kv_source import random_kv_caches, source_args, source_env, synthetic_block_hashes

BENCH_LAYOUT = KVLayout("llama", num_layers=16, num_kv_heads=4, head_dim=64, dtype="bfloat16", block_size=16)
PROMPT_TOKENS = 4096  # 256 blocks of 256 KiB: 64 MiB of KV
REQUEST_ID = "bench-kv"
SEED = 7
SETTLE_S = 0.1  # quiet time before each measured transfer: the previous one's frees and threads settle
BEST_GOAL, GRPC_GOAL = 0.80, 0.40  # fractions of raw TCP (issue 20: best network KV >= 0.80)
SOURCE_READY_TIMEOUT_S, SOURCE_STOP_TIMEOUT_S = 60.0, 10.0
# The torch transport with every pull staged (no run is this long): its path before issue 20,
# measured in the same run as the direct one ("torch"), for the before/after ratio.
STAGED, STAGED_MIN_RUN_BYTES = "torch staged", 1 << 40
# Same-host hand-off (issue 20): goals against an in-process memcpy of the same bytes and raw TCP.
SHM, MEMCPY, BENCH_HOST_ID = "same-host shm", "in-process memcpy", "bench-host"
SHM_MEMCPY_GOAL, SHM_TCP_GOAL = 0.50, 2.0
GRANT_DIGESTS = "source's per-block digests at grant"  # prefill side, once per lease: not in a pull
RAW, RAW_SHARED = "raw tcp", "raw tcp, shared cores"
SHARED = frozenset({RAW_SHARED, SHM, MEMCPY})  # the paths run unpinned (module doc: Placement)


@dataclass(frozen=True)
class BenchResult:
    name: str
    mb_per_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.mb_per_s)


@dataclass(frozen=True)
class KVBenchReport:
    """Medians per path (RAW, `grpc`, `torch`, `tcp`, STAGED, RAW_SHARED, SHM, MEMCPY), the
    bytes of one pull, and whether every transport's destination blocks equalled the source's."""

    results: dict[str, BenchResult]
    size_bytes: int
    num_blocks: int
    bytes_per_block: int
    layout: KVLayout
    exact: bool
    grant_digests_ms: float  # median ms of hashing the pull's blocks per block, as the source does at grant

    def ratio(self, name: str) -> float:
        """The path's median over that of the raw TCP run in the same placement."""
        return self.results[name].median / self.results[baseline(name)].median

    @property
    def best(self) -> tuple[str, float]:
        """The best network transport (not the same-host one, nor the memcpy or raw baselines)."""
        name = max((n for n in self.results if n not in SHARED and n != RAW), key=self.ratio)
        return name, self.ratio(name)


def baseline(name: str) -> str:
    """The raw TCP path measured in the same placement as path `name`."""
    return RAW_SHARED if name in SHARED else RAW


class Receiver:
    """This process's side of a pull from a source process (kv_source.py): the source's bytes
    rebuilt here from the same seed (to check against), a destination cache on the same device,
    the handle of the source's lease (`lease_secret`: from the source's ready line,
    `source_lease_secret`), and the destination block ids (`_pool_like_ids`).
    `tandem bench kv` and the GPU check's hand-off step pull through it."""

    def __init__(
        self, layout: KVLayout, num_blocks: int, address: str, device: str = "cpu", lease_secret: bytes = b""
    ) -> None:
        self.source = KVBlockStore(random_kv_caches(layout, num_blocks, SEED, device), layout)
        self.dest = KVBlockStore(random_kv_caches(layout, num_blocks, SEED + 1, device), layout)
        self.handle = KVHandle(
            REQUEST_ID,
            "bench-source",
            address,
            tuple(range(num_blocks)),
            num_blocks * layout.block_size,
            layout,
            synthetic_block_hashes(tuple(range(num_blocks))),
            time.time() + 3600,
            lease_secret,
        )
        self.dst_ids = _pool_like_ids(num_blocks)

    @property
    def size_bytes(self) -> int:
        """Bytes of one pull: every block of the source's lease."""
        return len(self.dst_ids) * self.dest.bytes_per_block

    async def pull(self, transport: KVTransport, timeout_s: float, host_id: str = "") -> TransferStats:
        """One whole pull of the lease's blocks into `dst_ids` (KVTransferError if it fails);
        `host_id`: the source's, as a prefill worker's handle carries it (same-host pulls)."""
        handle = dataclasses.replace(self.handle, source_host_id=host_id) if host_id else self.handle
        return await transport.pull(handle, handle.block_ids, self.dst_ids, self.dest, timeout_s=timeout_s)

    def clear_dest(self) -> None:
        """Zero the destination cache, so that `exact()` after a pull proves that this pull
        wrote every block (the source's random blocks are never all zeros)."""
        for cache in self.dest.kv_caches:
            cache.zero_()

    def exact(self) -> bool:
        """Whether the destination blocks hold exactly the source's bytes."""
        index = torch.tensor(self.dst_ids, device=self.dest.device)
        return all(torch.equal(s, d[:, index]) for s, d in zip(self.source.kv_caches, self.dest.kv_caches))


@contextlib.contextmanager
def source_process(
    layout: KVLayout, num_blocks: int, token: ClusterToken, device: str = "cpu", raw_tcp: bool = False
) -> Iterator[ChildProcess]:
    """A ready kv_source child holding `num_blocks` random blocks (seed SEED) on `device` under
    the lease REQUEST_ID, serving the torch and tcp transports' servicers (the torch one serves
    gRPC pulls too) to callers that present `token`; stopped by pid on exit."""
    argv = source_args(
        layout, num_blocks, SEED, "torch,tcp", REQUEST_ID, raw_tcp=raw_tcp, device=device, host_id=BENCH_HOST_ID
    )
    source = ChildProcess.start("kv-source", argv, SOURCE_READY_TIMEOUT_S, env=source_env(token), forward=False)
    try:
        yield source
    finally:
        source.stop(SOURCE_STOP_TIMEOUT_S)


def source_lease_secret(source: ChildProcess) -> bytes:
    """The secret of a ready kv_source child's lease (from its ready line)."""
    assert source.ready is not None  # start() returns a ready child
    return bytes.fromhex(source.ready["lease_secret"])


def measure_kv(rounds: int = 9, prompt_tokens: int = PROMPT_TOKENS) -> KVBenchReport:
    """Run the interleaved rounds (see the module docstring) and return the medians."""
    torch.set_num_threads(1)  # one core for the receiver, one for the source (2-core hosts)
    layout = BENCH_LAYOUT
    num_blocks = -(-prompt_tokens // layout.block_size)
    token = ClusterToken.generate()
    with source_process(layout, num_blocks, token, raw_tcp=True) as source:
        assert source.ready is not None  # start() returns a ready child
        raw_port = int(source.ready["raw_tcp_port"])
        secret = source_lease_secret(source)
        with Placement(source.pid) as placement:
            return asyncio.run(_bench(layout, num_blocks, source.address, secret, raw_port, rounds, token, placement))


class Placement:
    """Where the source's threads and this process's run (module doc): `apart()` pins every
    thread of each process to a core of its own, `shared()` lets all of them use every core
    this process could use on entry; exit restores that. On a host with one core, or without
    sched_setaffinity, both do nothing. Threads started later inherit their starter's mask."""

    def __init__(self, source_pid: int) -> None:
        self.source_pid = source_pid
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shared()

    def apart(self) -> None:
        if len(self.cpus) > 1:
            _pin_threads(os.getpid(), {self.cpus[0]})
            _pin_threads(self.source_pid, {self.cpus[1]})

    def shared(self) -> None:
        if len(self.cpus) > 1:
            _pin_threads(os.getpid(), set(self.cpus))
            _pin_threads(self.source_pid, set(self.cpus))


def _pin_threads(pid: int, cpus: set[int]) -> None:
    try:
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # no /proc: the process's main thread only
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)


def run_kv_bench(out: Callable[[str], None] = print, rounds: int = 9, prompt_tokens: int = PROMPT_TOKENS) -> int:
    """Run the benchmark and print one line per path; 1 if a transfer was not exact."""
    report = measure_kv(rounds, prompt_tokens)
    _report(report, out)
    return 0 if report.exact else 1


async def _bench(
    layout: KVLayout,
    num_blocks: int,
    address: str,
    lease_secret: bytes,
    raw_port: int,
    rounds: int,
    token: ClusterToken,
    placement: Placement,
) -> KVBenchReport:
    receiver = Receiver(layout, num_blocks, address, lease_secret=lease_secret)
    size_bytes = receiver.size_bytes
    transports = {
        name: create_transport(name, KVTransferConfig(transport=name, token=token)) for name in ("grpc", "torch", "tcp")
    }
    staged = KVTransferConfig(transport="torch", token=token, direct_min_run_bytes=STAGED_MIN_RUN_BYTES)
    transports[STAGED] = create_transport("torch", staged)
    # as a decode worker pulls from a same-host source; a pull that fell back to the network fails the bench
    shm_config = KVTransferConfig(transport="grpc", token=token, host_id=BENCH_HOST_ID)
    same_host = SameHostTransport(create_transport("grpc", shm_config), shm_config)
    transports[SHM] = same_host
    copy_src = torch.randint(0, 256, (size_bytes,), dtype=torch.uint8)
    copy_dst = torch.empty_like(copy_src)
    raw = socket.create_connection(("127.0.0.1", raw_port))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = bytearray(size_bytes)
    paths = (RAW, *(name for name in transports if name != SHM), RAW_SHARED, SHM, MEMCPY)  # in the order run
    results = {name: BenchResult(name, []) for name in paths}
    source_planes, grant_digests_s = planes(receiver.source.kv_caches), []
    exact = True

    async def raw_round(name: str, measured: bool) -> None:  # RAW or RAW_SHARED, in the current placement
        await asyncio.sleep(SETTLE_S)
        seconds = await asyncio.to_thread(_raw_tcp_once, raw, received)
        if measured:
            results[name].mb_per_s.append(size_bytes / seconds / 1e6)

    try:
        for round_index in range(rounds + 1):  # round 0 warms up channels, pairs and buffers
            placement.apart()
            await raw_round(RAW, round_index > 0)
            for name, transport in transports.items():
                if name == SHM:
                    placement.shared()
                    await raw_round(RAW_SHARED, round_index > 0)
                await asyncio.sleep(SETTLE_S)
                if round_index == 0:
                    receiver.clear_dest()
                stats = await receiver.pull(transport, timeout_s=60.0, host_id=BENCH_HOST_ID if name == SHM else "")
                if name == SHM and stats.transport != "shm":
                    raise RuntimeError(f"the same-host pull went over {stats.transport} ({stats.shm_fallback})")
                if name == SHM and same_host.shm.pooled.no_pool:  # the one-copy path, never the segment one
                    raise RuntimeError("the same-host pull went through a segment: the source's pool is not shared")
                if round_index == 0 and not receiver.exact():
                    exact = False
                if round_index:
                    results[name].mb_per_s.append(stats.mb_per_s)
            started = time.perf_counter()
            copy_dst.copy_(copy_src)
            if round_index:
                results[MEMCPY].mb_per_s.append(size_bytes / (time.perf_counter() - started) / 1e6)
            started = time.perf_counter()
            digest_blocks(source_planes, receiver.handle.block_ids)  # what a source's grant costs it
            if round_index:
                grant_digests_s.append(time.perf_counter() - started)
        await transports["grpc"].release(receiver.handle, timeout_s=5.0)
    finally:
        raw.close()
        for transport in transports.values():
            await transport.close()
    grant_digests_ms = statistics.median(grant_digests_s) * 1e3
    return KVBenchReport(
        results, size_bytes, num_blocks, receiver.dest.bytes_per_block, layout, exact, grant_digests_ms
    )


# ---- checksum cost of a pull ----------------------------------------------------------------


@dataclass(frozen=True)
class ChecksumCost:
    """Median seconds of one side's integrity check over one pull's bytes."""

    torch_check_s: float  # host_bytes + xxh64 per message (torch transport)
    host_copy_s: float  # host_bytes alone: the copy to the host (nothing to copy on CPU)
    grpc_check_s: float  # xxh64 per chunk over bytes on the host (gRPC transport)
    torch_digest: int  # the xxh64 the torch check computes over the packed blocks
    num_messages: int
    num_chunks: int
    chunk_bytes: int


def measure_checksums(
    store: KVBlockStore, block_ids: tuple[int, ...], config: KVTransferConfig, rounds: int
) -> ChecksumCost:
    """Time each transport's integrity check over `pack(block_ids)` on the store's device.
    The ids must be one ascending run (a source's lease): the packed buffer is then the
    concatenation of the planes (`plane_view`), as the torch source sends them."""
    views = [store.plane_view(block_ids, plane) for plane in range(store.num_planes)]
    if any(view is None for view in views):
        raise ValueError("measure_checksums needs block ids that form one ascending run")
    packed = torch.cat([v for v in views if v is not None])  # [bytes] on the cache's device
    messages = plan_messages(len(block_ids), store)
    slices = [packed[m.offset_bytes : m.offset_bytes + m.size_bytes] for m in messages]
    chunk_bytes = clamp_chunk_bytes(config.max_chunk_bytes)
    host = host_bytes(packed)  # what a gRPC source stages on the host before its chunks leave
    chunks = [host[offset : offset + chunk_bytes] for offset in range(0, len(host), chunk_bytes)]

    def torch_check() -> int:  # torch_transport._receive_messages and TorchKVServicer._send
        hasher = xxhash.xxh64()
        for piece in slices:
            hasher.update(host_bytes(piece))
        return hasher.intdigest()

    def host_copy() -> None:
        for piece in slices:
            host_bytes(piece)

    def grpc_check() -> None:  # grpc_receive.verify_and_copy and kv_codec.encode_chunk
        for chunk in chunks:
            xxhash.xxh64_intdigest(chunk)

    synchronize(store.device)
    digest = torch_check()  # also the warm-up
    return ChecksumCost(
        torch_check_s=_median_seconds(torch_check, rounds),
        host_copy_s=_median_seconds(host_copy, rounds),
        grpc_check_s=_median_seconds(grpc_check, rounds),
        torch_digest=digest,
        num_messages=len(messages),
        num_chunks=len(chunks),
        chunk_bytes=chunk_bytes,
    )


def _median_seconds(fn: Callable[[], object], rounds: int) -> float:
    seconds = []
    for _ in range(max(rounds, 1)):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA kernel returns at launch); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _report(report: KVBenchReport, out: Callable[[str], None]) -> None:
    lay, results = report.layout, report.results
    out(
        f"kv bench: {report.size_bytes / 2**20:.1f} MiB per pull ({report.num_blocks} blocks x "
        f"{report.bytes_per_block // 1024} KiB; {lay.num_layers} layers, {lay.num_kv_heads} KV heads x "
        f"{lay.head_dim}, {lay.dtype}), source process on 127.0.0.1, median of "
        f"{len(results[RAW].mb_per_s)} interleaved rounds"
    )
    if not report.exact:
        out("  a transport's destination blocks differ from the source")
    for name, result in results.items():
        spread = f"[{min(result.mb_per_s):.0f}..{max(result.mb_per_s):.0f}]"
        ratio = "" if name in (RAW, RAW_SHARED) else f"  {report.ratio(name):.2f} of {baseline(name)}"
        out(f"  {name:12s} {result.median:8.0f} MB/s {spread:>14s}{ratio}")
    best = report.best[1]
    grpc_ratio = report.ratio("grpc")
    out(
        f"  goals: best transport >= {BEST_GOAL:.2f} of raw tcp: {best:.3f} "
        f"({'met' if best >= BEST_GOAL else 'missed'}); grpc >= {GRPC_GOAL:.2f}: {grpc_ratio:.3f} "
        f"({'met' if grpc_ratio >= GRPC_GOAL else 'missed'})"
    )
    shm_copy = results[SHM].median / results[MEMCPY].median
    out(
        f"  same-host shm: {shm_copy:.3f} of an in-process memcpy (goal >= {SHM_MEMCPY_GOAL:.2f}), "
        f"{report.ratio(SHM):.2f}x {RAW_SHARED} (goal >= {SHM_TCP_GOAL:g})"
    )
    out(f"  {GRANT_DIGESTS}: {report.grant_digests_ms:.1f} ms per pull's blocks (once per lease, not in a pull)")
