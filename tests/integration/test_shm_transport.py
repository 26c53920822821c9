"""The same-host KV hand-off (issue 20, item 2): shared-memory segments between a source and a
receiver that report the same host id, the network as the fallback, and no segment left
behind when either side dies mid-transfer.

Sources run in this process (one event loop) or, for the kill tests, as a child process
(tests/integration/shm_source.py); every test uses its own segment directory, so that it can
assert that nothing is left there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tandem.common.kv_handle import KVHandle
from tandem.kvtransfer.base import FailureReason, KVTransferError
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVER_OPTIONS
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import GrpcTransport
from tandem.kvtransfer.same_host import SameHostTransport
from tandem.kvtransfer.shm_chunks import HEADER_BYTES, ChunkPlan, progress_word
from tandem.kvtransfer.shm_segments import PREFIX, SegmentName, sweep_dead
from tandem.kvtransfer.shm_source import ShmKVServicer
from tandem.loadtest.bench.kv_source import synthetic_block_hashes
from tests.integration.test_kvtransfer import (
    LEASED,
    Source,
    assert_moved,
    assert_untouched,
    make_dest,
    make_layout,
    make_source,
    snapshot,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 10.0
DST = tuple(range(50, 80))


def transport(shm_dir: Path, host_id: str) -> SameHostTransport:
    config = KVTransferConfig(shm_dir=str(shm_dir), host_id=host_id)
    return SameHostTransport(GrpcTransport(config), config)


@contextlib.asynccontextmanager
async def serving(
    source: Source, shm_dir: Path, host_id: str = "host-a"
) -> AsyncIterator[tuple[str, SameHostTransport]]:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    side = transport(shm_dir, host_id)
    side.add_source(server, source.store, source.leases)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", side
    finally:
        await server.stop(grace=None)
        await side.close()


def segments(shm_dir: Path) -> list[str]:
    return sorted(n for n in os.listdir(shm_dir) if n.startswith(PREFIX))


def shm_servicer(side: SameHostTransport) -> ShmKVServicer:
    return side._servicers[0]


def same_host_handle(source: Source, address: str, host_id: str = "host-a") -> KVHandle:
    return dataclasses.replace(source.handle(address), source_host_id=host_id)


def test_same_host_pull_is_exact_through_shm_and_leaves_no_segment(tmp_path: Path) -> None:
    async def run() -> None:
        source, dest = make_source(make_layout()), make_dest(make_layout())
        source.grant()
        before = snapshot(dest)
        async with serving(source, tmp_path) as (address, side):
            receiver = transport(tmp_path, "host-a")
            stats = await receiver.pull(same_host_handle(source, address), LEASED, DST, dest, TIMEOUT_S)
            assert (stats.transport, stats.shm_fallback, stats.num_blocks) == ("shm", "", len(LEASED))
            assert stats.bytes_moved == len(LEASED) * source.store.bytes_per_block
            assert_moved(source.store, LEASED, dest, DST, before)
            # the receiver keeps its segment for the next pull, the source keeps it mapped
            [name] = segments(tmp_path)
            assert receiver.shm.pool.names == [name] and shm_servicer(side).lent.names == [name]
            assert SegmentName.parse(name) == SegmentName(SegmentName.parse(name).namespace, os.getpid())  # type: ignore[union-attr]
            assert os.path.getsize(tmp_path / name) == 2 << 20  # a header and 30 blocks of 16 KiB, in 2 MiB
            assert shm_servicer(side).num_pulls_served == 1 and shm_servicer(side).collect() == []
            assert await receiver.release(same_host_handle(source, address), TIMEOUT_S) is True
            assert source.freed == ["req"]
            await receiver.close()
            assert segments(tmp_path) == []  # the receiver unlinked its pool
            assert shm_servicer(side).collect() == [] and shm_servicer(side).lent.names == []  # unmapped

    asyncio.run(run())


def test_segments_are_reused_across_pulls_and_sized_up_on_demand(tmp_path: Path) -> None:
    async def run() -> None:
        layout = make_layout()
        source = make_source(layout)
        source.grant()
        async with serving(source, tmp_path) as (address, side):
            receiver = transport(tmp_path, "host-a")
            handle = same_host_handle(source, address)
            for blocks, dst in ((LEASED, DST), (LEASED[:10], DST[20:]), (LEASED[5:], DST[5:])):
                dest = make_dest(layout)
                before = snapshot(dest)
                stats = await receiver.pull(handle, blocks, dst, dest, TIMEOUT_S)
                assert (stats.transport, stats.bytes_moved) == ("shm", len(blocks) * source.store.bytes_per_block)
                assert_moved(source.store, blocks, dest, dst, before)
            [name] = segments(tmp_path)
            assert receiver.shm.pool.num_created == 1 and shm_servicer(side).lent.names == [name]
            # a pull larger than every idle segment makes a bigger one; both stay in the pool
            receiver.shm.pool.discard(receiver.shm.pool.acquire(1 << 20))  # (take the 2 MiB one out of the way)
            big = await asyncio.to_thread(receiver.shm.pool.acquire, 3 << 20)
            assert big.size_bytes == 4 << 20 and receiver.shm.pool.num_created == 2
            receiver.shm.pool.give_back(big)
            assert segments(tmp_path) == [big.name]
            await receiver.close()
            assert segments(tmp_path) == []

    asyncio.run(run())


def test_concurrent_pulls_from_a_source_in_this_process_are_exact(tmp_path: Path) -> None:
    """More pulls at once than the loop's default executor has threads (min(32, cores + 4)):
    the readers wait on their own threads, so the source's copies still run."""

    async def run() -> None:
        layout = make_layout()
        source = make_source(layout)
        source.grant()
        async with serving(source, tmp_path) as (address, side):
            receiver = transport(tmp_path, "host-a")
            handle = same_host_handle(source, address)
            dest = make_dest(layout)
            before = snapshot(dest)
            pairs = [(LEASED[i : i + 3], DST[i : i + 3]) for i in range(0, 30, 3)]  # 10 pulls
            stats = await asyncio.gather(*(receiver.pull(handle, s, d, dest, TIMEOUT_S) for s, d in pairs))
            assert [(st.transport, st.num_blocks) for st in stats] == [("shm", 3)] * 10
            assert_moved(source.store, LEASED, dest, DST, before)
            assert shm_servicer(side).num_pulls_served == 10
            assert segments(tmp_path) == receiver.shm.pool.names and 1 <= receiver.shm.pool.num_created <= 10
            await receiver.close()
            assert segments(tmp_path) == []

    asyncio.run(run())


def test_a_serving_source_sweeps_dead_receivers_segments_it_never_mapped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tandem.kvtransfer.shm_source.SWEEP_PERIOD_S", 0.2)
    monkeypatch.setattr("tandem.kvtransfer.shm_transport.SWEEP_PERIOD_S", 0.2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)

    async def run() -> None:
        source = make_source(make_layout())
        source.grant()
        async with serving(source, tmp_path) as (address, _):
            receiver = transport(tmp_path, "host-a")  # (it sweeps when it starts: before the file exists)
            await receiver.pull(same_host_handle(source, address), LEASED, DST, make_dest(make_layout()), TIMEOUT_S)
            await receiver.close()  # its timer stops: only the source's janitor is left
            orphan = tmp_path / f"{PREFIX}{SegmentName.parse(SegmentName.new()).namespace}-{dead.pid}-{'a' * 16}"  # type: ignore[union-attr]
            orphan.write_bytes(b"x")
            for _ in range(100):
                if not orphan.exists():
                    break
                await asyncio.sleep(0.05)
            assert not orphan.exists() and segments(tmp_path) == []

    asyncio.run(run())


def test_other_host_id_goes_over_the_network(tmp_path: Path) -> None:
    async def run() -> None:
        source, dest = make_source(make_layout()), make_dest(make_layout())
        source.grant()
        before = snapshot(dest)
        async with serving(source, tmp_path) as (address, side):
            receiver = transport(tmp_path, "host-b")
            stats = await receiver.pull(same_host_handle(source, address), LEASED, DST, dest, TIMEOUT_S)
            assert (stats.transport, stats.shm_fallback) == ("grpc", "")
            assert_moved(source.store, LEASED, dest, DST, before)
            assert shm_servicer(side).num_pulls_served == 0  # never asked
            # a handle without a host id (a source that serves no same-host pulls): network too
            stats = await receiver.pull(source.handle(address), LEASED, DST, dest, TIMEOUT_S)
            assert stats.transport == "grpc" and shm_servicer(side).num_pulls_served == 0
            # the source refuses a pull that claims another host: FAILED_PRECONDITION, then network
            lying = transport(tmp_path, "host-c")
            stats = await lying.pull(same_host_handle(source, address, "host-c"), LEASED, DST, dest, TIMEOUT_S)
            assert (stats.transport, stats.shm_fallback) == ("grpc", "refused")
            assert shm_servicer(side).num_pulls_served == 0 and segments(tmp_path) == []
            await receiver.close()
            await lying.close()

    asyncio.run(run())


class CorruptingServicer(ShmKVServicer):
    """Packs and hashes into a private copy, flips a byte, then publishes the whole pull."""

    def pack_into(self, plan: ChunkPlan, segment_view: torch.Tensor) -> int:
        private = segment_view.clone()  # the receiver sees no progress in it
        checksum = super().pack_into(plan, private)
        private[HEADER_BYTES + 12345] ^= 0xFF
        segment_view[HEADER_BYTES:].copy_(private[HEADER_BYTES:])
        progress_word(segment_view)[0] = plan.size_bytes
        return checksum


def test_corrupted_segment_fails_closed(tmp_path: Path, monkeypatch) -> None:
    """The receiver unpacks each chunk as it reads it (shm_chunks.py): after the failure the
    destination blocks hold what the segment held (they are undefined: the decode worker
    gives them back uncached), and nothing is fetched again."""
    monkeypatch.setattr("tandem.kvtransfer.same_host.ShmKVServicer", CorruptingServicer)

    async def run() -> None:
        source, dest = make_source(make_layout()), make_dest(make_layout())
        source.grant()
        before = snapshot(dest)
        async with serving(source, tmp_path) as (address, side):
            receiver = transport(tmp_path, "host-a")
            with pytest.raises(KVTransferError) as caught:
                await receiver.pull(same_host_handle(source, address), LEASED, DST, dest, TIMEOUT_S)
            assert caught.value.reason is FailureReason.CHECKSUM
            assert f"{address}: segment {PREFIX}" in str(caught.value) and "the source sent" in str(caught.value)
            packed = source.store.pack(LEASED).view(torch.uint8).clone()
            packed[12345] ^= 0xFF
            expected = make_dest(make_layout())
            expected.unpack(packed, DST)
            assert all(torch.equal(d, e) for d, e in zip(dest.kv_caches, expected.kv_caches))
            assert not all(torch.equal(d, b) for d, b in zip(dest.kv_caches, before))
            assert side.network._servicers[0].num_pulls_served == 0  # type: ignore[attr-defined]  # not refetched
            assert segments(tmp_path) == []
            await receiver.close()

    asyncio.run(run())


class WholeCopyPlan(ChunkPlan):
    """The CUDA path's plan on CPU caches: pack at once, unpack after the check."""

    def __init__(self, store: KVBlockStore, block_ids: tuple[int, ...], per_chunk_copies: bool | None = None) -> None:
        super().__init__(store, block_ids, per_chunk_copies=False)


def test_without_per_chunk_copies_a_corrupted_segment_leaves_the_destination_untouched(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("tandem.kvtransfer.shm_source.ChunkPlan", WholeCopyPlan)
    monkeypatch.setattr("tandem.kvtransfer.shm_transport.ChunkPlan", WholeCopyPlan)

    async def run() -> None:
        source, dest = make_source(make_layout()), make_dest(make_layout())
        source.grant()
        before = snapshot(dest)
        receiver = transport(tmp_path, "host-a")
        async with serving(source, tmp_path) as (address, _):
            stats = await receiver.pull(same_host_handle(source, address), LEASED, DST, dest, TIMEOUT_S)
            assert (stats.transport, stats.num_chunks) == ("shm", 4)  # 4 planes of 30 blocks of 4 KiB
            assert_moved(source.store, LEASED, dest, DST, before)
        monkeypatch.setattr("tandem.kvtransfer.same_host.ShmKVServicer", CorruptingServicer)
        dest = make_dest(make_layout())
        async with serving(source, tmp_path) as (address, _):
            with pytest.raises(KVTransferError) as caught:
                await receiver.pull(same_host_handle(source, address), LEASED, DST, dest, TIMEOUT_S)
            assert caught.value.reason is FailureReason.CHECKSUM
            assert_untouched(dest, before)  # checked before the unpack
        await receiver.close()

    asyncio.run(run())


def test_unreachable_segment_falls_back_to_the_network_and_leaves_nothing(tmp_path: Path) -> None:
    """The source cannot see the receiver's directory (another /dev/shm, same host id)."""
    source_dir, receiver_dir = tmp_path / "source", tmp_path / "receiver"
    source_dir.mkdir(), receiver_dir.mkdir()

    async def run() -> None:
        source, dest = make_source(make_layout()), make_dest(make_layout())
        source.grant()
        before = snapshot(dest)
        async with serving(source, source_dir) as (address, side):
            receiver = transport(receiver_dir, "host-a")
            handle = same_host_handle(source, address)
            stats = await receiver.pull(handle, LEASED, DST, dest, TIMEOUT_S)
            assert (stats.transport, stats.shm_fallback) == ("grpc", "refused")
            assert_moved(source.store, LEASED, dest, DST, before)
            # the source could not open the receiver's segment; the receiver unlinked it
            assert segments(receiver_dir) == [] and segments(source_dir) == []
            assert shm_servicer(side).num_pulls_served == 0 and shm_servicer(side).lent.names == []
            assert await receiver.release(handle, TIMEOUT_S) is True
            await receiver.close()

    asyncio.run(run())


# ---- process death ----------------------------------------------------------------------
@contextlib.contextmanager
def source_process(shm_dir: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, dict]]:
    layout = make_layout()
    argv = [
        sys.executable,
        "-m",
        "tests.integration.shm_source",
        layout.describe(),
        "96",
        str(shm_dir),
        "host-a",
        *extra,
    ]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield proc, ready
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def remote_handle(ready: dict, blocks: tuple[int, ...] = LEASED) -> KVHandle:
    layout = make_layout()
    return KVHandle(
        "req",
        "prefill-0",
        ready["address"],
        tuple(range(96)),
        96 * 16,
        layout,
        synthetic_block_hashes(tuple(range(96))),
        time.time() + 60,
        bytes.fromhex(ready["lease_secret"]),
        "host-a",
    )


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_source_killed_mid_transfer_leaves_no_segment(tmp_path: Path) -> None:
    async def run(proc: subprocess.Popen, ready: dict) -> None:
        dest = make_dest(make_layout())
        before = snapshot(dest)
        receiver = transport(tmp_path, "host-a")
        pull = asyncio.ensure_future(receiver.pull(remote_handle(ready), LEASED, DST, dest, TIMEOUT_S))
        # the source has created and filled the segment, and hangs before answering
        assert await asyncio.to_thread(lambda: json.loads(proc.stdout.readline())) == {"event": "packing"}
        [name] = segments(tmp_path)  # the receiver's, lent to the source
        assert SegmentName.parse(name) is not None and SegmentName.parse(name).receiver_pid == os.getpid()
        os.kill(ready["pid"], signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        with pytest.raises(KVTransferError) as caught:
            await pull  # shm failed, and the network fallback finds the source gone too
        assert caught.value.reason is FailureReason.PEER_UNAVAILABLE
        assert_untouched(dest, before)
        assert segments(tmp_path) == []  # unlinked by the receiver: the failed pull's source may still write
        await receiver.close()

    with source_process(tmp_path, "hang") as (proc, ready):
        asyncio.run(run(proc, ready))


def test_cancelled_pull_unlinks_its_segment_and_writes_nothing_after(tmp_path: Path) -> None:
    async def run(proc: subprocess.Popen, ready: dict) -> None:
        dest = make_dest(make_layout())
        before = snapshot(dest)
        receiver = transport(tmp_path, "host-a")
        pull = asyncio.ensure_future(receiver.pull(remote_handle(ready), LEASED, DST, dest, TIMEOUT_S))
        assert await asyncio.to_thread(lambda: json.loads(proc.stdout.readline())) == {"event": "packing"}
        [name] = segments(tmp_path)
        assert receiver.shm.pool.names == [name]  # lent, being written
        pull.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pull
        # the source still holds its call (it hangs), but the receiver's reader has ended
        assert segments(tmp_path) == [] and receiver.shm.pool.names == []
        assert_untouched(dest, before)  # nothing was published
        await receiver.close()

    with source_process(tmp_path, "hang") as (proc, ready):
        asyncio.run(run(proc, ready))


RECEIVER = """
import os, sys
import grpc
from tandem.common import kv_codec
from tandem.kvtransfer.shm_pool import SegmentPool
segment = SegmentPool(sys.argv[5]).acquire(4096 + 30 * 16384)
request = kv_codec.PullKVRequest("req", tuple(range(10, 40)), sys.argv[2], 0, bytes.fromhex(sys.argv[3]),
                                 tuple(int(h) for h in sys.argv[4].split(",")), "host-a", os.getpid(), segment.name)
call = grpc.insecure_channel(sys.argv[1]).unary_unary(
    "/tandem.v1.KVTransfer/PullKVShm", kv_codec.pull_kv_request_to_bytes, kv_codec.shm_segment_from_bytes)
print(call(request, timeout=10).name, flush=True)
sys.stdin.read()  # killed here: the segment is packed, never mapped
"""


def test_receiver_killed_mid_transfer_leaves_no_segment(tmp_path: Path) -> None:
    with source_process(tmp_path) as (_, ready):
        hashes = ",".join(str(h) for h in synthetic_block_hashes(tuple(range(96)))[10:40])
        argv = [
            sys.executable,
            "-c",
            RECEIVER,
            ready["address"],
            make_layout().describe(),
            ready["lease_secret"],
            hashes,
            str(tmp_path),
        ]
        receiver = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert receiver.stdout is not None
            name = receiver.stdout.readline().strip()
            assert segments(tmp_path) == [name] and SegmentName.parse(name).receiver_pid == receiver.pid
            receiver.kill()
            receiver.wait(10)
            # the source's janitor sees the dead receiver and unlinks its segment
            assert wait_for(lambda: segments(tmp_path) == [], 5.0)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait(10)


def test_sweep_removes_only_dead_owners_segments_of_our_namespace(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    ns = SegmentName.parse(SegmentName.new()).namespace  # type: ignore[union-attr]
    names = {
        "live": f"{PREFIX}{ns}-{os.getpid()}-{'a' * 16}",
        "dead_receiver": f"{PREFIX}{ns}-{dead.pid}-{'c' * 16}",
        "other_namespace": f"{PREFIX}{ns + 1}-{dead.pid}-{'d' * 16}",
        "old_format": f"{PREFIX}{ns}-{dead.pid}-{dead.pid}-{'b' * 16}",
        "not_ours": "tandem-kv-something-else",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert sweep_dead(str(tmp_path)) == [names["dead_receiver"]]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [names["live"], names["other_namespace"], names["old_format"], names["not_ours"]]
    )
