"""Same-host KV with one copy: the receiver copies the leased blocks straight out of a CPU
source's shared KV pool (kvtransfer/shm_pool_source.py, engine.kv_cache.allocate_shared)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import crc32c
import pytest
import torch

from tandem.common.layout import KVLayout
from tandem.engine.kv_cache import KVCacheSpec, allocate_shared, shared_pool_path
from tandem.engine.outputs import HeldKV
from tandem.kvtransfer import shm_pool_copy, shm_pool_source
from tandem.kvtransfer.base import FailureReason, KVTransferError
from tandem.kvtransfer.block_digests import digest_blocks
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import GrpcTransport
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.same_host import SameHostTransport
from tandem.kvtransfer.shm_pool_copy import (
    MAX_COPY_THREADS,
    MIN_BYTES_PER_THREAD,
    chunks,
    copy_and_hash,
    copy_threads,
    hash_chunks,
    planes,
    runs,
)
from tandem.kvtransfer.shm_pool_mapping import PoolMappings
from tandem.kvtransfer.shm_segments import SegmentName, pid_namespace, sweep_dead
from tandem.kvtransfer.shm_source import ShmKVServicer
from tandem.loadtest.bench.kv_source import random_kv_caches, synthetic_block_hashes
from tests.integration.test_kvtransfer import (
    LEASED,
    NUM_BLOCKS,
    FakeClock,
    Source,
    assert_moved,
    make_dest,
    make_layout,
    make_source,
    snapshot,
)
from tests.integration.test_shm_transport import (
    REPO_ROOT,
    TIMEOUT_S,
    remote_handle,
    same_host_handle,
    serving,
    shm_servicer,
    source_process,
    transport,
    wait_for,
)

SHUFFLED = tuple(range(70, 80)) + tuple(range(50, 60)) + tuple(reversed(range(60, 70)))


def pooled_source(layout: KVLayout, shm_dir: Path) -> Source:
    """make_source's blocks, in a shared pool file in `shm_dir` (as a CPU prefill worker's)."""
    plain = make_source(layout)
    caches = allocate_shared(str(shm_dir), tuple(plain.store.kv_caches[0].shape), torch.float32, layout.num_layers)
    for into, cache in zip(caches, plain.store.kv_caches, strict=True):
        into.copy_(cache)
    freed: list[str] = []
    return Source(KVBlockStore(caches, layout), LeaseTable(freed.append, FakeClock()), FakeClock(), freed)


def files(shm_dir: Path) -> list[str]:
    return sorted(os.listdir(shm_dir))


def packed_chunk_crc32c(store: KVBlockStore, ids: tuple[int, ...], num_chunks: int) -> list[int]:
    """crc32c of each of `num_chunks` equal parts of the packed bytes of `ids`."""
    packed = store.pack(ids).view(torch.uint8).numpy().tobytes()
    size = len(packed) // num_chunks
    return [crc32c.crc32c(packed[i * size : (i + 1) * size]) for i in range(num_chunks)]


def test_runs_and_both_hashes_follow_the_packed_layout() -> None:
    assert runs((1, 2, 3, 7, 8), (5, 6, 9, 10, 11), 2) == [(1, 5, 2), (3, 9, 1), (7, 10, 2)]
    layout = make_layout()
    src, dst = make_source(layout).store, make_dest(layout)
    assert chunks(4, 30, 4096) == [(p, 0, 30) for p in range(4)]  # 2 layers x K/V, 30 blocks of 4 KiB
    assert chunks(1, 1200, 4096)[1:] == [(0, 512, 1024), (0, 1024, 1200)]  # at most 2 MiB each
    expected = packed_chunk_crc32c(src, LEASED, 4)
    assert hash_chunks(planes(src.kv_caches), LEASED) == expected
    before = snapshot(dst)
    assert copy_and_hash(planes(src.kv_caches), LEASED, planes(dst.kv_caches), SHUFFLED, [3, 1]) == expected[3:0:-2]
    assert copy_and_hash(planes(src.kv_caches), LEASED, planes(dst.kv_caches), SHUFFLED) == expected
    assert_moved(src, LEASED, dst, SHUFFLED, before)


def test_a_small_pull_is_copied_on_one_thread(monkeypatch) -> None:
    """Each copy thread hands its result back through the receiver's asyncio thread, so a pull
    gets one thread per MIN_BYTES_PER_THREAD bytes, and never more threads than chunks or cores."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert copy_threads(8, 256 * 1024) == 1  # the stack benchmark's 4-block pull
    assert copy_threads(8, 2 * MIN_BYTES_PER_THREAD - 1) == 1
    assert copy_threads(8, 2 * MIN_BYTES_PER_THREAD) == 2
    assert copy_threads(3, 64 * MIN_BYTES_PER_THREAD) == 3
    assert copy_threads(64, 64 * MIN_BYTES_PER_THREAD) == MAX_COPY_THREADS
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert copy_threads(64, 64 * MIN_BYTES_PER_THREAD) == 2


@pytest.mark.parametrize("min_bytes_per_thread", [MIN_BYTES_PER_THREAD, 1])  # one copy thread; several
def test_pull_copies_out_of_the_sources_pool_exactly_and_makes_no_segment(
    tmp_path: Path, monkeypatch, min_bytes_per_thread: int
) -> None:
    monkeypatch.setattr(shm_pool_copy, "MIN_BYTES_PER_THREAD", min_bytes_per_thread)

    async def run() -> None:
        layout = make_layout()
        source, dest = pooled_source(layout, tmp_path), make_dest(layout)
        [pool] = files(tmp_path)
        assert shared_pool_path(source.store.kv_caches) == str(tmp_path / pool)
        assert SegmentName.parse(pool) == SegmentName(pid_namespace(), os.getpid(), pool=True)
        assert os.stat(tmp_path / pool).st_mode & 0o777 == 0o600
        assert os.path.getsize(tmp_path / pool) == NUM_BLOCKS * source.store.bytes_per_block
        source.grant()
        async with serving(source, tmp_path) as (address, side):
            receiver = transport(tmp_path, "host-a")
            handle = same_host_handle(source, address)
            for dst in (SHUFFLED, tuple(range(50, 80))):  # shuffled runs, then one run
                before = snapshot(dest)
                stats = await receiver.pull(handle, LEASED, dst, dest, TIMEOUT_S)
                assert (stats.transport, stats.shm_fallback, stats.num_blocks) == ("shm", "", len(LEASED))
                assert stats.released is False  # not a decode worker's transport: the lease stays
                assert stats.bytes_moved == len(LEASED) * source.store.bytes_per_block
                assert_moved(source.store, LEASED, dest, dst, before)
            assert files(tmp_path) == [pool] and receiver.shm.pool.names == [] and receiver.shm.pooled.no_pool == set()
            assert shm_servicer(side).num_pulls_served == 2 and source.freed == []
            assert await receiver.release(handle, TIMEOUT_S) is True
            assert source.freed == ["req"]
            await receiver.close()

    asyncio.run(run())


class CorruptDigest(ShmKVServicer):
    def hash_pool(self, request_id: str, block_ids: tuple[int, ...]) -> list[int]:
        digests = super().hash_pool(request_id, block_ids)
        return [*digests[:-1], digests[-1] ^ 1]


def test_a_checksum_mismatch_fails_closed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tandem.kvtransfer.same_host.ShmKVServicer", CorruptDigest)

    async def run() -> None:
        layout = make_layout()
        source, dest = pooled_source(layout, tmp_path), make_dest(layout)
        source.grant()
        async with serving(source, tmp_path) as (address, _):
            receiver = transport(tmp_path, "host-a")
            for _ in range(2):  # the second copies early, out of the pool the first named
                with pytest.raises(KVTransferError) as caught:
                    await receiver.pull(same_host_handle(source, address), LEASED, SHUFFLED, dest, TIMEOUT_S)
                assert caught.value.reason is FailureReason.CHECKSUM  # never fetched again over the network
                assert str(caught.value).endswith("4 chunk checksums for 4 chunks, first differing chunk 3")
            assert receiver.shm.pooled.pools.last(address) is not None
            assert source.freed == []  # the lease stays until the receiver releases it
            await receiver.close()

    asyncio.run(run())


def releasing_transport(shm_dir: Path) -> SameHostTransport:
    """A decode worker's receiver: it pulls each lease once, and a verified pull releases it."""
    config = KVTransferConfig(shm_dir=str(shm_dir), host_id="host-a")
    return SameHostTransport(GrpcTransport(config), config, release_with_pull=True)


def test_a_decode_workers_verified_pull_releases_the_lease_and_its_stats_say_so(tmp_path: Path) -> None:
    async def run() -> None:
        layout = make_layout()
        source, dest = pooled_source(layout, tmp_path), make_dest(layout)
        source.grant()
        async with serving(source, tmp_path) as (address, _):
            receiver = releasing_transport(tmp_path)
            handle = same_host_handle(source, address)
            before = snapshot(dest)
            stats = await receiver.pull(handle, LEASED, SHUFFLED, dest, TIMEOUT_S)
            assert (stats.transport, stats.shm_fallback, stats.released) == ("shm", "", True)
            assert_moved(source.store, LEASED, dest, SHUFFLED, before)
            assert await asyncio.to_thread(wait_for, lambda: source.freed == ["req"], 5.0)
            assert source.leases.counters.released == 1 and source.leases.counters.active == 0
            # the hand-off sends no ReleaseKV (decode/handoff.py): one would find the lease gone
            assert await receiver.release(handle, TIMEOUT_S) is False
            assert source.freed == ["req"]
            await receiver.close()

    asyncio.run(run())


def test_a_pull_that_fails_its_checksum_does_not_release_the_lease(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tandem.kvtransfer.same_host.ShmKVServicer", CorruptDigest)

    async def run() -> None:
        layout = make_layout()
        source, dest = pooled_source(layout, tmp_path), make_dest(layout)
        source.grant()
        async with serving(source, tmp_path) as (address, _):
            receiver = releasing_transport(tmp_path)
            handle = same_host_handle(source, address)
            with pytest.raises(KVTransferError) as caught:
                await receiver.pull(handle, LEASED, SHUFFLED, dest, TIMEOUT_S)
            assert caught.value.reason is FailureReason.CHECKSUM
            await asyncio.sleep(0.2)
            assert source.freed == [] and source.leases.counters.released == 0  # fail closed: not released
            assert await receiver.release(handle, TIMEOUT_S) is True  # ReleaseKV, as for every failed pull
            assert source.freed == ["req"]
            await receiver.close()

    asyncio.run(run())


def test_a_source_without_a_shared_pool_is_pulled_through_a_segment(tmp_path: Path) -> None:
    async def run() -> None:
        layout = make_layout()
        source, dest = make_source(layout), make_dest(layout)
        source.grant()
        async with serving(source, tmp_path) as (address, _):
            receiver = transport(tmp_path, "host-a")
            before = snapshot(dest)
            stats = await receiver.pull(same_host_handle(source, address), LEASED, SHUFFLED, dest, TIMEOUT_S)
            assert (stats.transport, stats.shm_fallback) == ("shm", "")
            assert_moved(source.store, LEASED, dest, SHUFFLED, before)
            assert receiver.shm.pooled.no_pool == {address} and len(receiver.shm.pool.names) == 1
            await receiver.close()

    asyncio.run(run())


def test_a_pool_of_the_wrong_owner_or_size_is_refused(tmp_path: Path) -> None:
    layout = make_layout()
    store = make_dest(layout)
    caches = allocate_shared(str(tmp_path), tuple(store.kv_caches[0].shape), torch.float32, layout.num_layers)
    [name] = files(tmp_path)
    mappings = PoolMappings(str(tmp_path))
    with pytest.raises(ValueError, match=f"is not a KV pool of source pid {os.getpid() + 1} in this namespace"):
        mappings.get(name, os.getpid() + 1, store, NUM_BLOCKS)
    with pytest.raises(ValueError, match=f"has {NUM_BLOCKS * store.bytes_per_block} bytes, the layout needs"):
        mappings.get(name, os.getpid(), store, NUM_BLOCKS - 1)
    segment_name = f"tandem-kv-{pid_namespace()}-{os.getpid()}-{'0' * 16}"  # a segment, not a pool
    with pytest.raises(ValueError, match="is not a KV pool"):
        mappings.get(segment_name, os.getpid(), store, NUM_BLOCKS)
    os.symlink(tmp_path / name, tmp_path / name.replace("pool-", "pool-f"))  # never followed
    with pytest.raises(OSError):
        mappings.get(name.replace("pool-", "pool-f")[: len(name)], os.getpid(), store, NUM_BLOCKS)
    mapping = mappings.get(name, os.getpid(), store, NUM_BLOCKS)
    caches[1][1, 3].fill_(7.0)  # the receiver sees the source's writes: one shared file
    assert mapping.planes[3][3].tobytes() == caches[1][1, 3].numpy().tobytes()
    assert not mapping.planes[3].flags.writeable  # mapped read-only
    assert mappings.get(name, os.getpid(), store, NUM_BLOCKS) is mapping  # cached, re-checked


def test_killed_pooled_source_leaves_nothing_in_the_shm_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tandem.kvtransfer.shm_transport.SWEEP_PERIOD_S", 0.2)

    async def run(proc, ready: dict) -> None:
        [pool] = files(tmp_path)
        assert SegmentName.parse(pool) == SegmentName(pid_namespace(), ready["pid"], pool=True)
        layout = make_layout()
        dest = make_dest(layout, 96)
        receiver = transport(tmp_path, "host-a")
        pull = asyncio.ensure_future(receiver.pull(remote_handle(ready), LEASED, LEASED, dest, TIMEOUT_S))
        # the source sent its pool and hangs hashing it; the receiver has mapped it
        assert await asyncio.to_thread(proc.stdout.readline) == '{"event": "hashing"}\n'
        os.kill(ready["pid"], signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        with pytest.raises(KVTransferError) as caught:
            await pull  # the network fallback finds the source gone too
        assert caught.value.reason is FailureReason.PEER_UNAVAILABLE
        # the receiver sweeps the dead source's pool (on the failure, else within a sweep period)
        assert await asyncio.to_thread(wait_for, lambda: files(tmp_path) == [], 5.0)
        await receiver.close()

    with source_process(tmp_path, "hang", "pool") as (proc, ready):
        asyncio.run(run(proc, ready))


def test_a_receiver_gone_mid_pull_leaves_nothing_of_its_own_and_a_dead_sources_pool_is_swept(tmp_path: Path) -> None:
    async def run(proc, ready: dict) -> None:
        dest = make_dest(make_layout(), 96)
        receiver = transport(tmp_path, "host-a")
        pull = asyncio.ensure_future(receiver.pull(remote_handle(ready), LEASED, LEASED, dest, TIMEOUT_S))
        assert await asyncio.to_thread(proc.stdout.readline) == '{"event": "hashing"}\n'
        pull.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pull
        await receiver.close()
        assert [SegmentName.parse(n).pool for n in files(tmp_path)] == [True]  # type: ignore[union-attr]

    with source_process(tmp_path, "hang", "pool") as (proc, ready):
        asyncio.run(run(proc, ready))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert sweep_dead(str(tmp_path)) != [] and files(tmp_path) == []


def test_the_leased_blocks_stay_pinned_until_the_receivers_copy_is_done(tmp_path: Path, monkeypatch) -> None:
    """A lease that ends (expiry, revoke) while the receiver copies out of the pool frees its
    blocks only once the receiver half-closed the stream: the copy never reads reused blocks."""
    copying, go = threading.Event(), threading.Event()
    real_copy = shm_pool_source.copy_and_hash

    def slow_copy(*args):
        copying.set()
        assert go.wait(TIMEOUT_S)
        return real_copy(*args)

    monkeypatch.setattr(shm_pool_source, "copy_and_hash", slow_copy)

    async def run() -> None:
        layout = make_layout()
        source, dest = pooled_source(layout, tmp_path), make_dest(layout)
        source.grant()
        async with serving(source, tmp_path) as (address, side):
            receiver = transport(tmp_path, "host-a")
            before = snapshot(dest)
            pull = asyncio.ensure_future(receiver.pull(same_host_handle(source, address), LEASED, SHUFFLED, dest, 30))
            assert await asyncio.to_thread(copying.wait, TIMEOUT_S)
            # the source has sent its checksum and waits for the receiver
            assert await asyncio.to_thread(wait_for, lambda: shm_servicer(side).num_pulls_served == 1, 5.0)
            assert source.leases.revoke("req") is True
            await asyncio.sleep(0.2)
            assert source.freed == []  # pinned by the open stream
            go.set()
            stats = await pull
            assert stats.transport == "shm"
            assert_moved(source.store, LEASED, dest, SHUFFLED, before)
            assert await asyncio.to_thread(wait_for, lambda: source.freed == ["req"], 5.0)
            await receiver.close()

    asyncio.run(run())


def test_a_cache_that_cannot_be_shared_is_private_and_served_through_segments(tmp_path: Path, caplog) -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32)
    caches = spec.allocate(8, torch.device("cpu"), str(tmp_path / "missing"))
    assert [tuple(c.shape) for c in caches] == [(2, 8, 16, 2, 32)] * 2 and all(int(c.abs().sum()) == 0 for c in caches)
    assert shared_pool_path(caches) is None and not (tmp_path / "missing").exists()
    assert "KV cache not in shared memory" in caplog.text
    shared = spec.allocate(8, torch.device("cpu"), str(tmp_path))
    assert shared_pool_path(shared) == str(tmp_path / files(tmp_path)[0])


POOL_RECEIVER = """
import os, sys, threading
import grpc
from tandem.common import kv_codec
request = kv_codec.PullKVRequest("req", tuple(range(10, 40)), sys.argv[2], 0, bytes.fromhex(sys.argv[3]),
                                 tuple(int(h) for h in sys.argv[4].split(",")), "host-a", os.getpid(), "")
def requests():
    yield request
    threading.Event().wait()  # never half-closes: killed mid-pull
call = grpc.insecure_channel(sys.argv[1]).stream_stream(
    "/tandem.v1.KVTransfer/PullKVShmPool", kv_codec.pull_kv_request_to_bytes, kv_codec.shm_pool_from_bytes)
answers = call(requests(), timeout=30)
print(next(answers).name, len(next(answers).checksums), flush=True)
sys.stdin.read()
"""


def test_a_receiver_killed_mid_pull_leaves_nothing_and_the_source_serves_on(tmp_path: Path) -> None:
    with source_process(tmp_path, "pool") as (_, ready):
        [pool] = files(tmp_path)
        hashes = ",".join(str(h) for h in synthetic_block_hashes(tuple(range(96)))[10:40])
        argv = [sys.executable, "-c", POOL_RECEIVER, ready["address"], make_layout().describe()]
        argv += [ready["lease_secret"], hashes]
        receiver = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert receiver.stdout is not None
            assert receiver.stdout.readline() == f"{pool} 4\n"  # the pool, then 4 chunk checksums
            receiver.kill()
            receiver.wait(10)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait(10)
        assert files(tmp_path) == [pool]  # the receiver made nothing; the source's pool stays

        async def pull_again() -> None:
            layout = make_layout()
            source = KVBlockStore(random_kv_caches(layout, 96, 1), layout)  # shm_source's bytes
            dest = make_dest(layout, 96)
            before = snapshot(dest)
            receiver = transport(tmp_path, "host-a")
            stats = await receiver.pull(remote_handle(ready), LEASED, SHUFFLED, dest, TIMEOUT_S)
            assert (stats.transport, stats.shm_fallback) == ("shm", "")
            assert_moved(source, LEASED, dest, SHUFFLED, before)
            await receiver.close()

        asyncio.run(pull_again())


def test_a_lease_granted_while_serving_is_hashed_once_and_a_block_changed_since_fails_closed(
    tmp_path: Path, monkeypatch
) -> None:
    def no_pull_time_hash(*_: object) -> list[int]:
        raise AssertionError("the pull hashed the source's blocks again")

    async def run() -> None:
        layout = make_layout()
        source, dest = pooled_source(layout, tmp_path), make_dest(layout)
        async with serving(source, tmp_path) as (address, side):
            source.grant()  # as a prefill worker grants: its transport already serves
            digests = shm_servicer(side).digests
            assert digests is not None
            committed = digests.for_pull("req", LEASED)
            assert committed is not None
            assert committed.tolist() == digest_blocks(planes(source.store.kv_caches), LEASED).tolist()
            monkeypatch.setattr("tandem.kvtransfer.shm_source.hash_chunks", no_pull_time_hash)
            receiver = transport(tmp_path, "host-a")
            handle = same_host_handle(source, address)
            before = snapshot(dest)
            stats = await receiver.pull(handle, LEASED, SHUFFLED, dest, TIMEOUT_S)
            assert (stats.transport, stats.shm_fallback) == ("shm", "")
            assert_moved(source.store, LEASED, dest, SHUFFLED, before)
            # a byte of layer 1's V in block 25 changes in the pool after the grant: caught
            source.store.kv_caches[1][1, 25].view(torch.uint8).view(-1)[100] ^= 0x01
            with pytest.raises(KVTransferError) as caught:
                await receiver.pull(handle, LEASED, SHUFFLED, dest, TIMEOUT_S)
            assert caught.value.reason is FailureReason.CHECKSUM  # never fetched again over the network
            assert str(caught.value).endswith("4 chunk checksums for 4 chunks, first differing chunk 3")
            assert await receiver.release(handle, TIMEOUT_S) is True
            assert source.freed == ["req"] and digests.for_pull("req", LEASED) is None  # dropped with the lease
            await receiver.close()

    asyncio.run(run())


def test_a_source_whose_cache_has_no_host_view_serves_same_host_pulls_without_pool_or_digests(tmp_path: Path) -> None:
    """A CUDA prefill worker's cache (the meta device stands in for it here: neither has a
    numpy view) gets the segment path only: building its servicer must not read the cache."""
    layout = make_layout()
    caches = [torch.empty((2, NUM_BLOCKS, 16, 2, 32), device="meta") for _ in range(layout.num_layers)]
    store = KVBlockStore(caches, layout)
    leases = LeaseTable(on_free=lambda request_id: None)
    servicer = ShmKVServicer(store, leases, KVTransferConfig(shm_dir=str(tmp_path)), "host-a")
    assert (servicer.planes, servicer.digests) == ([], None)
    leases.grant("req", HeldKV(LEASED, len(LEASED) * 16, synthetic_block_hashes(LEASED)), 30.0)  # nothing hashed
    assert leases.counters.active == 1
    servicer.close()
