"""GPU-check step 3: the KV hand-off between two processes on one GPU, over the torch transport
(NCCL on CUDA) and the gRPC transport, beside a device-to-device copy of the same bytes, and
what the transports' integrity check costs when the blocks live on the GPU.

1. A kv_source process (tandem.loadtest.bench.kv_source) holds the KV of PROMPT_TOKENS tokens
   in HANDOFF_LAYOUT on the device, under a lease; this process is the receiver
   (`tandem.loadtest.bench.kv.Receiver`), its destination cache on the same device.
2. Rounds interleave one flat copy of a pull's bytes on the device, a torch pull and a gRPC
   pull. Round 0 warms up (channels, the pair, Triton's pack/unpack kernels) and checks that
   each transport wrote exactly the source's bytes into a zeroed destination. A pull is timed
   from its call until the device has finished the receiver's unpack.
3. A transport whose pull fails is dropped from later rounds and reported with its error. On
   one GPU NCCL refuses the pair (two ranks of one communicator on one device: "Duplicate GPU
   detected"); that row says "refused", with NCCL's own words (the NCCL_DEBUG=WARN lines of
   both processes, written to debug files in the step's folder) and the reason.
4. Checksums: both transports hash what they move with xxh64 on the host, on both sides. The
   torch transport copies each message to the host for it (`host_bytes`); the gRPC transport
   hashes each chunk of bytes already staged on the host. Both are timed here on the same
   packed blocks, with the transports' own functions and message/chunk plans.

The measurement (`measure_handoff`) is apart from the tables (`handoff_tables`), so that tests
run the first on CPU (gloo instead of NCCL) and check the second on any measurement.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tandem.common.layout import KVLayout
from tandem.common.plane_auth import ClusterToken
from tandem.kvtransfer.base import KVTransferError, KVTransport, TransferStats, create_transport
from tandem.kvtransfer.config import KVTransferConfig
from tandem.loadtest.bench.kv import (
    ChecksumCost,
    Receiver,
    measure_checksums,
    source_lease_secret,
    source_process,
    synchronize,
)
from tandem.loadtest.gpu.report import Table, markdown_table
from tandem.loadtest.gpu.steps import Skip, StepFailed

HANDOFF_LAYOUT = KVLayout("llama", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)
# 128 blocks of 2 MiB: 256 MiB per pull, the most that the transports' staging pools keep
# between pulls by default (a bigger pull would re-allocate its pinned staging every time).
PROMPT_TOKENS = 2048
ROUNDS = 5
PULL_TIMEOUT_S = 20.0  # bounds a pull whose pair never forms; NCCL's refusal comes well before
COPIES_PER_TIMING = 10  # device copies per timing, so that one synchronize is small beside them
NCCL_GOAL = 0.70  # issue 14: NCCL hand-off >= 70% of a device-to-device copy of the same bytes
TRANSPORTS = ("torch", "grpc")
NO_CUDA = (
    "no CUDA device here (torch.cuda.is_available() is False): the hand-off step needs both "
    "processes' KV caches on a GPU"
)
DUPLICATE_GPU = "Duplicate GPU detected"
NCCL_WARN = "NCCL WARN "
NCCL_LOG_GLOB = "nccl.*.log"
SAME_GPU_REASON = (
    "NCCL admits one rank per GPU in a communicator, and both processes hold their KV on device 0 "
    "of a one-GPU machine, so the pair cannot form here; the NCCL figure needs two GPUs, or a "
    "same-GPU path (CUDA IPC), which the transports do not have"
)


@dataclasses.dataclass(frozen=True)
class PathResult:
    """One transport's pulls. `bytes_moved` is one pull's, as the transport reported it (0 if
    no pull completed); `exact`: the warm-up pull wrote exactly the source's bytes."""

    transport: str  # "torch" | "grpc"
    label: str  # "torch (NCCL)", "torch (gloo)", "grpc"
    bytes_moved: int
    mb_per_s: tuple[float, ...]  # one per measured round
    exact: bool
    error: str = ""  # the KVTransferError of the pull that failed, if one did


@dataclasses.dataclass(frozen=True)
class HandoffMeasurement:
    device: str  # torch device type of both caches: "cuda" or "cpu"
    device_name: str  # "NVIDIA H100 80GB HBM3", or "CPU"
    layout: KVLayout
    num_blocks: int
    bytes_per_block: int
    rounds: int
    copy_mb_per_s: tuple[float, ...]
    paths: tuple[PathResult, ...]
    checksum: ChecksumCost
    nccl_warnings: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def run(work: Path) -> list[Table]:
    """The step (steps.py): skips without CUDA; StepFailed if a destination differs from the
    source, or a transport failed other than by NCCL's same-GPU refusal."""
    if not torch.cuda.is_available():
        raise Skip(NO_CUDA)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NCCL_DEBUG", "WARN")  # read at NCCL's first use, here and in the source
    os.environ["NCCL_DEBUG_FILE"] = str(work / "nccl.%h.%p.log")
    measurement = measure_handoff("cuda", out=print)
    measurement = dataclasses.replace(measurement, nccl_warnings=nccl_warnings(work))
    tables = handoff_tables(measurement)
    for table in tables:  # also in the step's output, should the process then hang on exit
        print("\n".join(markdown_table(table)), flush=True)
    check_handoff(measurement, tables)
    return tables


def measure_handoff(
    device: str,
    layout: KVLayout = HANDOFF_LAYOUT,
    prompt_tokens: int = PROMPT_TOKENS,
    rounds: int = ROUNDS,
    pull_timeout_s: float = PULL_TIMEOUT_S,
    out: Callable[[str], object] = lambda line: None,
) -> HandoffMeasurement:
    """Start the source process on `device`, run the rounds and the checksum timings."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    num_blocks = -(-prompt_tokens // layout.block_size)
    token = ClusterToken.generate()
    with source_process(layout, num_blocks, token, device) as source:
        receiver = Receiver(layout, num_blocks, source.address, device, source_lease_secret(source))
        return asyncio.run(_measure(device, receiver, rounds, pull_timeout_s, out, token))


async def _measure(
    device: str,
    receiver: Receiver,
    rounds: int,
    pull_timeout_s: float,
    out: Callable[[str], object],
    token: ClusterToken,
) -> HandoffMeasurement:
    size_bytes, layout, num_blocks = receiver.size_bytes, receiver.handle.layout, len(receiver.dst_ids)
    transports = {name: create_transport(name, KVTransferConfig(transport=name, token=token)) for name in TRANSPORTS}
    mb_per_s: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
    moved, exact, errors = dict.fromkeys(TRANSPORTS, 0), dict.fromkeys(TRANSPORTS, False), dict.fromkeys(TRANSPORTS, "")
    copy_src = torch.ones(size_bytes, dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)
    copy_mb_per_s: list[float] = []
    try:
        for round_index in range(rounds + 1):  # round 0 warms up and checks the bytes
            seconds = _copy_seconds(copy_src, copy_dst)
            if round_index:
                copy_mb_per_s.append(size_bytes / seconds / 1e6)
            for name in [n for n in TRANSPORTS if not errors[n]]:
                if round_index == 0:
                    receiver.clear_dest()
                try:
                    stats, seconds = await _timed_pull(receiver, transports[name], pull_timeout_s)
                except Exception as exc:  # a KVTransferError, or a bug: reported either way
                    errors[name] = str(exc) if isinstance(exc, KVTransferError) else f"{type(exc).__name__}: {exc}"
                    out(f"handoff: {name} pull failed in round {round_index}: {exc}")
                    continue
                moved[name] = stats.bytes_moved
                if round_index == 0:
                    exact[name] = receiver.exact()
                else:
                    mb_per_s[name].append(stats.bytes_moved / seconds / 1e6)
                out(f"handoff: round {round_index} {name}: {stats.bytes_moved / seconds / 1e6:.0f} MB/s")
        await transports["grpc"].release(receiver.handle, timeout_s=5.0)
    finally:
        for transport in transports.values():
            await transport.close()
    paths = tuple(
        PathResult(name, path_label(name, device), moved[name], tuple(mb_per_s[name]), exact[name], errors[name])
        for name in TRANSPORTS
    )
    checksum = measure_checksums(receiver.source, receiver.handle.block_ids, KVTransferConfig(), rounds)
    name = torch.cuda.get_device_name(receiver.dest.device) if device == "cuda" else "CPU"
    return HandoffMeasurement(
        device, name, layout, num_blocks, receiver.dest.bytes_per_block, rounds, tuple(copy_mb_per_s), paths, checksum
    )


def path_label(transport: str, device: str) -> str:
    if transport == "torch":
        return f"torch ({'NCCL' if device == 'cuda' else 'gloo'})"
    return transport


def _copy_seconds(src: torch.Tensor, dst: torch.Tensor) -> float:
    """Seconds of one flat copy of `src` into `dst` (the mean of COPIES_PER_TIMING)."""
    synchronize(src.device)
    started = time.perf_counter()
    for _ in range(COPIES_PER_TIMING):
        dst.copy_(src)
    synchronize(src.device)
    return (time.perf_counter() - started) / COPIES_PER_TIMING


async def _timed_pull(receiver: Receiver, transport: KVTransport, timeout_s: float) -> tuple[TransferStats, float]:
    """One pull, timed until the device has finished the unpack (a transport returns once the
    unpack is launched; on CUDA its kernel may still run)."""
    started = time.perf_counter()
    stats = await receiver.pull(transport, timeout_s)
    synchronize(receiver.dest.device)
    return stats, time.perf_counter() - started


def nccl_warnings(folder: Path) -> tuple[str, ...]:
    """NCCL's WARN messages from the debug files in `folder` (NCCL_DEBUG_FILE), each once, in
    the order of the files' names, without NCCL's "host:pid:tid [dev]" prefix."""
    found: list[str] = []
    for path in sorted(folder.glob(NCCL_LOG_GLOB)):
        for line in path.read_text(errors="replace").splitlines():
            _, sep, message = line.partition(NCCL_WARN)
            if sep and message.strip() not in found:
                found.append(message.strip())
    return tuple(found)


# ---- tables -------------------------------------------------------------------------------


def refused(measurement: HandoffMeasurement, path: PathResult) -> bool:
    """Whether `path` failed because NCCL refused two ranks on one GPU (the known limit of a
    one-GPU machine), as NCCL's warnings or the transport's error say."""
    texts = (path.error, *measurement.nccl_warnings)
    return bool(path.error) and path.transport == "torch" and any(DUPLICATE_GPU in text for text in texts)


def handoff_tables(measurement: HandoffMeasurement) -> list[Table]:
    return [_transfer_table(measurement), _checksum_table(measurement)]


def _pull_seconds(measurement: HandoffMeasurement, path: PathResult) -> float | None:
    """Median seconds of one pull, None if the path has no figures."""
    if path.error or not path.mb_per_s:
        return None
    return measurement.size_bytes / (statistics.median(path.mb_per_s) * 1e6)


def _transfer_table(m: HandoffMeasurement) -> Table:
    copy = statistics.median(m.copy_mb_per_s)
    rows = [("device-to-device copy", f"{copy:.0f}", _spread(m.copy_mb_per_s), "1.00", "-")]
    lay = m.layout
    notes = [
        f"{_mib(m.size_bytes)} MiB per pull: {m.num_blocks} blocks of {m.bytes_per_block // 1024} KiB "
        f"({lay.num_layers} layers, {lay.num_kv_heads} KV heads x {lay.head_dim}, {lay.dtype}, block size "
        f"{lay.block_size}); source process and receiver with their caches on {m.device}; median of "
        f"{m.rounds} interleaved rounds after a warm-up round. A pull is timed from its call to the end of "
        "the receiver's unpack on the device (source pack, transfer, checksums on both sides, unpack into "
        "a shuffled block table); the copy is one flat copy of the same bytes on the device, each byte "
        "counted once.",
    ]
    for path in m.paths:
        destination = "-" if not path.bytes_moved else ("exact" if path.exact else "differs from the source")
        if path.error:
            rows.append((path.label, "refused" if refused(m, path) else "failed", "-", "-", destination))
            notes.append(f"{path.label} {'refused' if refused(m, path) else 'failed'}: {path.error}")
            notes.extend(f"NCCL: {warning}" for warning in m.nccl_warnings)
            if refused(m, path):
                notes.append(f"why: {SAME_GPU_REASON}")
            continue
        median = statistics.median(path.mb_per_s)
        rows.append((path.label, f"{median:.0f}", _spread(path.mb_per_s), f"{median / copy:.2f}", destination))
        if path.label == "torch (NCCL)":
            met = "met" if median / copy >= NCCL_GOAL else "missed"
            notes.append(f"goal: torch (NCCL) >= {NCCL_GOAL:.2f} of the device copy: {median / copy:.3f} ({met})")
    headers = ("path", "MB/s (median)", "range", "of device copy", "destination")
    return Table(f"KV hand-off between two processes on one {m.device_name}", headers, tuple(rows), tuple(notes))


def _checksum_table(m: HandoffMeasurement) -> Table:
    cost = m.checksum
    by_transport = {path.transport: path for path in m.paths}
    chunk_mib = cost.chunk_bytes / 2**20
    entries = (
        (f"torch: host_bytes + xxh64 per message ({cost.num_messages} messages)", cost.torch_check_s, "torch"),
        ("torch: of which host_bytes (the copy to the host)", cost.host_copy_s, "torch"),
        (f"grpc: xxh64 per chunk of {chunk_mib:g} MiB ({cost.num_chunks} chunks)", cost.grpc_check_s, "grpc"),
    )
    rows = []
    for label, seconds, transport in entries:
        pull_s = _pull_seconds(m, by_transport[transport])
        share = "-" if pull_s is None else f"{seconds / pull_s:.2f}"
        rows.append((label, f"{seconds * 1e3:.2f}", f"{m.size_bytes / seconds / 1e9:.1f}", share))
    notes = (
        f"One side's check over one pull's {_mib(m.size_bytes)} MiB, the blocks on {m.device}, median of "
        f"{m.rounds}; each transport checks on both sides (the source over what it sends, the receiver "
        "over what lands). xxh64 runs on the host: the torch transport first copies each message there "
        "(host_bytes), the gRPC transport hashes chunks already staged on the host.",
    )
    headers = ("integrity check (xxh64)", "ms per pull (median)", "GB/s", "of the transport's pull")
    return Table("Checksum cost over the same bytes", headers, tuple(rows), notes)


def _mib(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:.4g}"


def _spread(values: tuple[float, ...]) -> str:
    return f"{min(values):.0f}..{max(values):.0f}"


def check_handoff(measurement: HandoffMeasurement, tables: list[Table]) -> None:
    """StepFailed (with `tables`) if a destination differs from the source or a transport
    failed other than by NCCL's same-GPU refusal."""
    problems = []
    for path in measurement.paths:
        if path.error and not refused(measurement, path):
            problems.append(f"{path.label} failed: {path.error}")
        elif path.bytes_moved and not path.exact:
            problems.append(f"{path.label}: the destination blocks differ from the source's")
    if problems:
        raise StepFailed("; ".join(problems), tables)
