"""The KV hand-off over real sockets: a grpc.aio server hosting the source servicer over a
random KV cache, and receivers pulling into another cache.

The gRPC transport runs source and receiver in this process (one event loop). The torch
transport's source runs in a subprocess (loadtest/tandem/loadtest/bench/kv_source.py), as in
production; a few failure cases also run it in-process, which gloo supports (each pair
forms in its own threads). Every case asserts exact bytes, or the exact failure reason and
a message that names the culprit, and that the destination is untouched on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
import torch

from tandem.common.kv_codec import ChunkDecodeError, decode_chunk, encode_chunk, handle_from_proto, handle_to_proto
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout, LayoutMismatchError
from tandem.common.pb import tandem_pb2 as pb
from tandem.engine.outputs import HeldKV
from tandem.kernels.reference import ref_pack_blocks, ref_unpack_blocks
from tandem.kvtransfer.base import FailureReason, KVTransferError, create_transport
from tandem.kvtransfer.block_store import KVBlockStore, PackedReader
from tandem.kvtransfer.channels import SERVER_OPTIONS
from tandem.kvtransfer.config import KVTransferConfig, MiB
from tandem.kvtransfer.grpc_transport import KVTransferServicer, clamp_chunk_bytes
from tandem.kvtransfer.leases import BlockHashMismatch, LeaseCounters, LeaseError, LeaseGrant, LeaseTable
from tandem.kvtransfer.torch_source import TorchKVServicer
from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import wait_all_ready
from tandem.loadtest.bench.kv import source_lease_secret
from tandem.loadtest.bench.kv_source import random_kv_caches, source_args, synthetic_block_hashes
from tests.integration.workers import cluster_token

NUM_BLOCKS = 96
LEASED = tuple(range(10, 40))  # the source's held prompt blocks
TIMEOUT_S = 10.0


def make_layout(dtype: str = "float32", block_size: int = 16, num_layers: int = 2) -> KVLayout:
    return KVLayout("llama", num_layers=num_layers, num_kv_heads=2, head_dim=32, dtype=dtype, block_size=block_size)


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class Source:
    store: KVBlockStore
    leases: LeaseTable
    clock: FakeClock
    freed: list[str] = field(default_factory=list)
    secrets: dict[str, bytes] = field(default_factory=dict)  # request id -> its lease's secret

    def grant(self, request_id: str = "req", blocks: tuple[int, ...] = LEASED, ttl_s: float = 30.0) -> LeaseGrant:
        grant = self.leases.grant(
            request_id,
            HeldKV(blocks, len(blocks) * self.store.layout.block_size, synthetic_block_hashes(blocks)),
            ttl_s,
        )
        self.secrets[request_id] = grant.secret
        return grant

    def handle(
        self,
        address: str,
        request_id: str = "req",
        blocks: tuple[int, ...] = LEASED,
        layout: KVLayout | None = None,
        secret: bytes | None = None,
    ) -> KVHandle:
        """The handle of the lease of `request_id`, with its secret unless `secret` is given."""
        return KVHandle(
            request_id,
            "prefill-0",
            address,
            blocks,
            len(blocks) * 16,
            layout or self.store.layout,
            synthetic_block_hashes(blocks),
            self.clock() + 30,
            self.secrets.get(request_id, b"") if secret is None else secret,
        )


def make_source(layout: KVLayout, num_blocks: int = NUM_BLOCKS, seed: int = 1) -> Source:
    clock, freed = FakeClock(), list[str]()
    store = KVBlockStore(random_kv_caches(layout, num_blocks, seed), layout)
    return Source(store, LeaseTable(freed.append, clock), clock, freed)


def make_dest(layout: KVLayout, num_blocks: int = NUM_BLOCKS) -> KVBlockStore:
    return KVBlockStore(random_kv_caches(layout, num_blocks, seed=99), layout)


def snapshot(store: KVBlockStore) -> list[torch.Tensor]:
    return [c.clone() for c in store.kv_caches]


def assert_moved(
    src: KVBlockStore, src_ids: tuple[int, ...], dst: KVBlockStore, dst_ids: tuple[int, ...], before: list[torch.Tensor]
) -> None:
    """Destination blocks equal the source blocks exactly; every other block is unchanged."""
    others = [b for b in range(dst.num_blocks) if b not in set(dst_ids)]
    for s, d, old in zip(src.kv_caches, dst.kv_caches, before):
        assert torch.equal(d[:, list(dst_ids)], s[:, list(src_ids)])
        assert torch.equal(d[:, others], old[:, others])


def assert_untouched(dst: KVBlockStore, before: list[torch.Tensor]) -> None:
    assert all(torch.equal(d, old) for d, old in zip(dst.kv_caches, before))


@contextlib.asynccontextmanager
async def serving(servicer: KVTransferServicer) -> AsyncIterator[str]:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
        servicer.close()


async def expect_failure(pull: asyncio.Future | object, reason: FailureReason, *fragments: str) -> KVTransferError:
    with pytest.raises(KVTransferError) as info:
        await pull  # type: ignore[misc]
    assert info.value.reason is reason, str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return info.value


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- block store, chunk codec, handle codec ---------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ids", [(5, 9, 3, 40), tuple(range(20, 60)), (1, 2, 3, 50, 51, 52)])
def test_block_store_matches_the_reference(dtype: str, ids: tuple[int, ...]) -> None:
    src = make_source(make_layout(dtype)).store
    k, v = [c[0] for c in src.kv_caches], [c[1] for c in src.kv_caches]
    packed = src.pack(ids)
    assert packed.dtype == src.dtype and packed.numel() * packed.element_size() == len(ids) * src.bytes_per_block
    assert torch.equal(packed, ref_pack_blocks(k, v, ids))
    staging = torch.empty(len(ids) * src.bytes_per_block, dtype=torch.uint8)
    reader = PackedReader(src, ids, staging if PackedReader.needs_staging(src, ids) else None)
    step = 5000  # reads that cut across blocks and planes
    pieces = [
        bytes(p)
        for off in range(0, reader.total_bytes, step)
        for p in reader.read(off, min(step, reader.total_bytes - off))
    ]
    assert b"".join(pieces) == packed.view(torch.uint8).numpy().tobytes()
    dst, expected = make_dest(src.layout), make_dest(src.layout)
    dst_ids = tuple(reversed(range(50, 50 + len(ids))))
    dst.unpack(packed.view(torch.uint8), dst_ids)
    ref_unpack_blocks(packed, [c[0] for c in expected.kv_caches], [c[1] for c in expected.kv_caches], dst_ids)
    assert all(torch.equal(a, b) for a, b in zip(dst.kv_caches, expected.kv_caches))


def test_block_store_rejects_bad_ids_and_buffers() -> None:
    store = make_source(make_layout()).store
    with pytest.raises(ValueError, match="block id 96 is outside"):
        store.pack([1, 96])
    with pytest.raises(ValueError, match="block id 4 appears twice"):
        store.pack([4, 5, 4])
    with pytest.raises(ValueError, match="has 100 bytes, expected"):
        store.unpack(torch.zeros(100, dtype=torch.uint8), [1])
    with pytest.raises(ValueError, match="layer 0 is torch.float32"):
        KVBlockStore(store.kv_caches, make_layout("bfloat16"))


def test_chunk_codec_is_protobuf_wire_compatible() -> None:
    data = bytes(range(256)) * 40
    encoded = encode_chunk([memoryview(data[:1000]), memoryview(data[1000:])], 4096, 1 << 20, "bfloat16", (2, 2, 3))
    parsed = pb.KVChunk.FromString(encoded)  # what any generated client sees
    header = (parsed.offset_bytes, parsed.total_bytes, parsed.dtype, tuple(parsed.shape))
    assert header == (4096, 1 << 20, "bfloat16", (2, 2, 3))
    assert parsed.data == data
    message = pb.KVChunk(offset_bytes=7, data=data, checksum=11, total_bytes=9, dtype="x", shape=[1])
    chunk = decode_chunk(message.SerializeToString())
    assert (chunk.offset_bytes, chunk.checksum, chunk.total_bytes, chunk.dtype, chunk.shape) == (7, 11, 9, "x", (1,))
    assert bytes(chunk.data) == data
    with pytest.raises(ChunkDecodeError):
        decode_chunk(encoded[:-10])


def test_handle_codec_round_trip_and_checks() -> None:
    secret = bytes(range(32))
    handle = KVHandle("r", "p0", "10.0.0.1:50051", (3, 4, 9), 40, make_layout(), (7, 8), 123.5, secret)
    assert handle_to_proto(handle).layout == make_layout().describe()
    assert handle_to_proto(handle).lease_secret == secret
    assert handle_from_proto(handle_to_proto(handle)) == handle
    assert secret.hex() not in repr(handle) and repr(secret) not in repr(handle)  # kept out of logs
    layout = make_layout().describe()
    with pytest.raises(ValueError, match="repeats a block id"):
        handle_from_proto(
            pb.KVHandle(request_id="r", source_address="a:1", block_ids=[1, 1], layout=layout, lease_secret=secret)
        )
    with pytest.raises(ValueError, match="^handle.layout: malformed KV layout field 'block_size'$"):
        handle_from_proto(
            pb.KVHandle(request_id="r", source_address="a:1", block_ids=[1], layout="block_size", lease_secret=secret)
        )
    for size in (0, 16, 31, 33, 1024):
        msg = handle_to_proto(handle)
        msg.lease_secret = bytes(size)
        with pytest.raises(ValueError, match=f"^handle.lease_secret must be 32 bytes, got {size}$"):
            handle_from_proto(msg)


def test_handle_check_is_the_receivers_one_check() -> None:
    handle = KVHandle("r", "p0", "10.0.0.1:50051", (3, 4, 9), 40, make_layout(block_size=16), (7, 8), 123.5)
    handle.check(make_layout(block_size=16), "r", 40)
    with pytest.raises(LayoutMismatchError, match=r"^KV layout mismatch: block_size \(ours 32, theirs 16\)$"):
        handle.check(make_layout(block_size=32), "r", 40)
    with pytest.raises(ValueError, match="^handle.request_id differs from request.request_id$"):
        handle.check(make_layout(), "other", 40)
    with pytest.raises(ValueError, match="^handle covers 40 tokens in 3 blocks; the prompt has 41 tokens$"):
        handle.check(make_layout(), "r", 41)


# ---- lease table --------------------------------------------------------------------------------
def test_lease_release_during_a_pull_is_deferred_and_frees_once() -> None:
    source = make_source(make_layout())
    secret = source.grant("a").secret
    with source.leases.checkout("a", (10, 11), secret, synthetic_block_hashes((10, 11))) as held:
        assert held.block_ids == LEASED
        assert source.leases.release("a", secret) is True
        assert source.leases.release("a", secret) is False
        assert source.freed == []  # still being read
        with pytest.raises(LeaseError, match="the lease for request 'a' was released"):
            source.leases.check("a", (10,), secret, synthetic_block_hashes((10,)))
    assert source.freed == ["a"]
    assert source.leases.counters == LeaseCounters(granted=1, released=1, expired=0, active=0)
    with pytest.raises(LeaseError, match="the lease for request 'a' was released"):
        source.leases.check("a", (10,), secret, synthetic_block_hashes((10,)))


def test_lease_expiry_is_deferred_while_pinned_and_frees_once() -> None:
    source = make_source(make_layout())
    secret = source.grant("a", ttl_s=5.0).secret
    source.grant("b", ttl_s=50.0)
    with source.leases.checkout("a", (12,), secret, synthetic_block_hashes((12,))):
        source.clock.now_s += 10.0
        with pytest.raises(LeaseError, match=r"the lease for request 'a' expired 5\.000 s ago"):
            source.leases.check("a", (12,), secret, synthetic_block_hashes((12,)))
        assert source.leases.expire(source.clock()) == ["a"]
        assert source.freed == []
        assert source.leases.expire(source.clock()) == []
    assert source.freed == ["a"]
    assert source.leases.release("a", secret) is False
    source.clock.now_s += 100.0
    assert source.leases.expire(source.clock()) == ["b"]
    assert source.freed == ["a", "b"]
    assert source.leases.counters == LeaseCounters(granted=2, released=0, expired=2, active=0)


def test_lease_checkout_names_the_problem() -> None:
    source = make_source(make_layout())
    secret = source.grant("a").secret
    for block_ids, message in [
        ((10, 99), "block id 99 is not in the lease for request 'a'"),
        ((10, 10), "repeat an id"),
        ((), "no block ids requested"),
        (tuple(range(50)), "50 block ids requested but the lease for 'a' holds 30"),
    ]:
        with (
            pytest.raises(LeaseError, match=message),
            source.leases.checkout("a", block_ids, secret, synthetic_block_hashes(block_ids)),
        ):
            pass
    with pytest.raises(LeaseError, match="^no lease for request 'zz' \\(unknown request id, or not its secret\\)$"):
        source.leases.check("zz", (1,), secret, synthetic_block_hashes((1,)))
    with pytest.raises(LeaseError, match="already has a lease"):
        source.grant("a")
    assert source.freed == [] and len(source.leases) == 1


def test_lease_refuses_block_hashes_that_are_not_its_own() -> None:
    source = make_source(make_layout())
    secret = source.grant("a").secret
    source.leases.grant("p", HeldKV((50, 51), 20, synthetic_block_hashes((50,))), 30.0)  # 51: partial
    prefix = "^block hashes differ from the lease's for request"
    forged = (synthetic_block_hashes((10,))[0], 7)
    for request_id, block_ids, hashes, message in [
        (
            "a",
            (10, 11),
            forged,
            f"{prefix} 'a': block 11 has hash 0x0000b10c0000000b, the receiver expects 0x0000000000000007$",
        ),
        ("a", (10, 11), synthetic_block_hashes((10,)), f"{prefix} 'a': 1 hashes for 2 block ids$"),
    ]:
        with (
            pytest.raises(BlockHashMismatch, match=message),
            source.leases.checkout(request_id, block_ids, secret, hashes),
        ):
            pass
    with pytest.raises(BlockHashMismatch, match=f"{prefix} 'p': block 51 is not a full block \\(it has no hash\\)$"):
        source.leases.check("p", (50, 51), source.leases._leases["p"].secret, synthetic_block_hashes((50, 51)))
    source.leases.check("p", (50,), source.leases._leases["p"].secret, synthetic_block_hashes((50,)))
    assert source.freed == [] and source.leases.counters == LeaseCounters(granted=2, released=0, expired=0, active=2)


def test_lease_without_its_secret_reads_as_unknown_and_is_untouched() -> None:
    source = make_source(make_layout())
    secret = source.grant("a").secret
    assert len(secret) == 32 and secret != source.grant("b").secret
    unknown = "^no lease for request 'a' \\(unknown request id, or not its secret\\)$"
    for wrong in (b"", bytes(32), secret[:-1], secret + b"\x00", source.secrets["b"]):
        with (
            pytest.raises(LeaseError, match=unknown),
            source.leases.checkout("a", (10,), wrong, synthetic_block_hashes((10,))),
        ):
            pass
        with pytest.raises(LeaseError, match=unknown):
            source.leases.check("a", (10,), wrong, synthetic_block_hashes((10,)))
        assert source.leases.release("a", wrong) is False
    assert source.leases.counters == LeaseCounters(granted=2, released=0, expired=0, active=2)
    with source.leases.checkout("a", (10,), secret, synthetic_block_hashes((10,))) as held:  # its holder still pulls it
        assert held.block_ids == LEASED
    assert source.leases.release("a", secret) is True
    # once it ended, only its holder is told how; anyone else still sees an unknown id
    with pytest.raises(LeaseError, match=unknown):
        source.leases.check("a", (10,), bytes(32), synthetic_block_hashes((10,)))
    with pytest.raises(LeaseError, match="^the lease for request 'a' was released$"):
        source.leases.check("a", (10,), secret, synthetic_block_hashes((10,)))
    # the source's own end (a cancelled Prefill, the owner's Abort, a drain) needs no secret
    assert source.leases.revoke("b") is True and source.leases.revoke("b") is False
    assert source.freed == ["a", "b"]
    assert source.leases.counters == LeaseCounters(granted=2, released=2, expired=0, active=0)


def test_lease_table_frees_exactly_once_under_concurrency() -> None:
    source = make_source(make_layout())
    ids = [f"r{i}" for i in range(200)]
    for request_id in ids:
        source.grant(request_id)

    def pull_then_release(request_id: str) -> None:
        secret = source.secrets[request_id]
        with (
            contextlib.suppress(LeaseError),
            source.leases.checkout(request_id, (10, 11), secret, synthetic_block_hashes((10, 11))),
        ):
            source.leases.release(request_id, secret)
        source.leases.release(request_id, secret)

    threads = [
        threading.Thread(target=lambda r=r: [pull_then_release(r), source.leases.expire(source.clock() + 60)])
        for r in ids
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(source.freed) == sorted(ids) and len(source.leases) == 0
    counters = source.leases.counters
    assert counters.released + counters.expired == len(ids)


# ---- gRPC transport -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grpc_pull_moves_exactly_the_missing_blocks(dtype: str) -> None:
    source, dest = make_source(make_layout(dtype)), make_dest(make_layout(dtype))
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc")
        async with serving(KVTransferServicer(source.store, source.leases, KVTransferConfig())) as address:
            handle = source.handle(address)
            src_ids, dst_ids = LEASED[3:], tuple(range(60, 60 + len(LEASED) - 3))  # 3 blocks cached on D
            stats = await transport.pull(handle, src_ids, dst_ids, dest, TIMEOUT_S)
            assert (stats.bytes_moved, stats.num_blocks, stats.num_chunks) == (27 * dest.bytes_per_block, 27, 1)
            assert_moved(source.store, src_ids, dest, dst_ids, before)
            assert source.freed == []
            assert await transport.release(handle, TIMEOUT_S) is True
            assert await transport.release(handle, TIMEOUT_S) is False
            assert len(transport.channels) == 1  # one channel per peer, reused
        await transport.close()

    asyncio.run(main())
    assert source.freed == ["req"]


def test_grpc_pull_of_more_than_4_mib_streams_checked_chunks() -> None:
    layout = make_layout("float32", num_layers=4)  # 32 KiB per block
    source, dest = make_source(layout, num_blocks=300), make_dest(layout, num_blocks=300)
    blocks = tuple(range(0, 290, 2))  # not one run: packed plane by plane on the source
    source.grant(blocks=blocks)
    before = snapshot(dest)
    total = len(blocks) * dest.bytes_per_block
    assert total > 4 * MiB

    async def main() -> None:
        for chunk_bytes in (4 * MiB, 1 * MiB):
            transport = create_transport("grpc", KVTransferConfig(max_chunk_bytes=chunk_bytes))
            async with serving(KVTransferServicer(source.store, source.leases, KVTransferConfig())) as address:
                dst_ids = tuple(range(150, 150 + len(blocks)))
                stats = await transport.pull(source.handle(address, blocks=blocks), blocks, dst_ids, dest, TIMEOUT_S)
                assert stats.num_chunks == -(-total // chunk_bytes) and stats.bytes_moved == total
                assert_moved(source.store, blocks, dest, dst_ids, before)
            await transport.close()

    asyncio.run(main())


def test_grpc_chunks_need_not_align_with_blocks() -> None:
    assert [clamp_chunk_bytes(n) for n in (0, 1, 3 * MiB, 9 * MiB)] == [4 * MiB, MiB, 3 * MiB, 4 * MiB]
    layout = KVLayout("llama", num_layers=3, num_kv_heads=2, head_dim=24, dtype="float32", block_size=16)
    source, dest = make_source(layout), make_dest(layout)  # 18 KiB blocks: 1 MiB chunks split blocks
    blocks = tuple(range(0, 90))
    source.grant(blocks=blocks)
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc", KVTransferConfig(max_chunk_bytes=MiB))
        dst_ids = tuple(reversed(range(90)))
        async with serving(KVTransferServicer(source.store, source.leases, KVTransferConfig())) as address:
            stats = await transport.pull(source.handle(address, blocks=blocks), blocks, dst_ids, dest, TIMEOUT_S)
            assert stats.num_chunks == 2 and stats.bytes_moved == 90 * dest.bytes_per_block
            assert_moved(source.store, blocks, dest, dst_ids, before)
        await transport.close()

    asyncio.run(main())


class CorruptingServicer(KVTransferServicer):
    """Flips one byte of the second chunk's data after its checksum was computed."""

    def encode_chunk(self, reader: PackedReader, offset_bytes: int, size_bytes: int) -> bytes:
        encoded = super().encode_chunk(reader, offset_bytes, size_bytes)
        if offset_bytes == 0:
            return encoded
        return encoded[:-100] + bytes([encoded[-100] ^ 0x01]) + encoded[-99:]


def test_grpc_corrupted_chunk_is_a_checksum_error_and_leaves_the_destination_untouched() -> None:
    layout = make_layout(num_layers=8)  # 64 KiB per block: 30 blocks make two 1 MiB chunks
    source, dest = make_source(layout), make_dest(layout)
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc", KVTransferConfig(max_chunk_bytes=1 * MiB))
        async with serving(CorruptingServicer(source.store, source.leases, KVTransferConfig())) as address:
            blocks = LEASED
            error = await expect_failure(
                transport.pull(source.handle(address), blocks, tuple(range(50, 80)), dest, TIMEOUT_S),
                FailureReason.CHECKSUM,
                "chunk at offset 1048576 has xxh64",
            )
            assert address in str(error)
        await transport.close()

    asyncio.run(main())
    assert_untouched(dest, before)
    assert source.freed == [] and len(source.leases) == 1  # the pull unpinned, the lease stays


def test_grpc_corrupted_middle_chunk_fails_while_the_next_arrives_and_its_buffer_comes_back() -> None:
    """The second of three chunks is checked in a thread while the third arrives: its checksum
    error fails the pull, the copy thread has ended before the staging buffer goes back to the
    pool, and the destination is untouched."""
    layout = make_layout(num_layers=8)  # 64 KiB per block: 40 blocks make three 1 MiB chunks (the last 0.5)
    source, dest = make_source(layout), make_dest(layout)
    blocks = tuple(range(10, 50))
    source.grant(blocks=blocks)
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc", KVTransferConfig(max_chunk_bytes=1 * MiB))
        async with serving(CorruptingServicer(source.store, source.leases, KVTransferConfig())) as address:
            await expect_failure(
                transport.pull(source.handle(address, blocks=blocks), blocks, tuple(range(50, 90)), dest, TIMEOUT_S),
                FailureReason.CHECKSUM,
                "chunk at offset 1048576 has xxh64",
            )
            assert transport.staging.idle_bytes == 3 * MiB  # 2.5 MiB rounded up to whole MiB, given back
        await transport.close()

    asyncio.run(main())
    assert_untouched(dest, before)
    assert source.freed == [] and len(source.leases) == 1


def test_layout_mismatch_names_the_field_on_both_sides() -> None:
    source, dest = make_source(make_layout(block_size=16)), make_dest(make_layout(block_size=32))
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc")
        async with serving(KVTransferServicer(source.store, source.leases, KVTransferConfig())) as address:
            # the receiver's caller compares the handle's layout with its own, once
            with pytest.raises(LayoutMismatchError, match=r"block_size \(ours 32, theirs 16\)"):
                source.handle(address).check(dest.layout, "req", len(LEASED) * 16)
            # a pull that skipped that check, or a handle that lies about the layout: the source
            # compares the receiver's layout with its own, once
            for handle in (source.handle(address), source.handle(address, layout=dest.layout)):
                await expect_failure(
                    transport.pull(handle, (10,), (1,), dest, TIMEOUT_S),
                    FailureReason.LAYOUT_MISMATCH,
                    "block_size (ours 16, theirs 32)",
                    "FAILED_PRECONDITION",
                )
        await transport.close()

    asyncio.run(main())
    assert_untouched(dest, before)


def test_source_refuses_unknown_outside_and_expired_leases() -> None:
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc")
        async with serving(KVTransferServicer(source.store, source.leases, KVTransferConfig())) as address:
            await expect_failure(
                transport.pull(source.handle(address, request_id="ghost"), (10,), (1,), dest, TIMEOUT_S),
                FailureReason.REFUSED,
                "no lease for request 'ghost' (unknown request id, or not its secret)",
            )
            stale = source.handle(address, blocks=LEASED + (77,))  # a handle naming a block the lease lacks
            await expect_failure(
                transport.pull(stale, (11, 77), (1, 2), dest, TIMEOUT_S),
                FailureReason.REFUSED,
                "block id 77 is not in the lease for request 'req'",
            )
            source.clock.now_s += 31.0
            await expect_failure(
                transport.pull(source.handle(address), (10,), (1,), dest, TIMEOUT_S),
                FailureReason.REFUSED,
                "the lease for request 'req' expired 1.000 s ago",
            )
            assert source.leases.expire(source.clock()) == ["req"]
            await expect_failure(
                transport.pull(source.handle(address), (10,), (1,), dest, TIMEOUT_S),
                FailureReason.REFUSED,
                "the lease for request 'req' was expired",
            )
        await transport.close()

    asyncio.run(main())
    assert_untouched(dest, before)
    assert source.freed == ["req"]


def test_pull_whose_hashes_are_not_the_leases_is_refused_and_reads_nothing() -> None:
    """Cache poisoning at the source: a holder of the lease's handle and secret claims other
    hashes for its blocks (another prompt's). The source sends nothing."""
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc")
        servicer = KVTransferServicer(source.store, source.leases, KVTransferConfig())
        async with serving(servicer) as address:
            genuine = source.handle(address)
            forged = dataclasses.replace(genuine, block_hashes=tuple(h ^ 1 for h in genuine.block_hashes))
            await expect_failure(
                transport.pull(forged, (10, 11), (1, 2), dest, TIMEOUT_S),
                FailureReason.HASH_MISMATCH,
                "FAILED_PRECONDITION: block hashes differ from the lease's for request 'req': "
                "block 10 has hash 0x0000b10c0000000a, the receiver expects 0x0000b10c0000000b",
            )
            assert (servicer.num_pulls_served, servicer.bytes_served) == (0, 0)  # nothing was read
            assert_untouched(dest, before)
            stats = await transport.pull(genuine, (10, 11), (1, 2), dest, TIMEOUT_S)  # its own hashes
            assert (servicer.num_pulls_served, servicer.bytes_served) == (1, stats.bytes_moved)
            assert_moved(source.store, (10, 11), dest, (1, 2), before)
            assert await transport.release(genuine, TIMEOUT_S) is True
        await transport.close()

    asyncio.run(main())
    assert source.freed == ["req"]


def test_pull_and_release_without_the_lease_secret_are_refused_and_read_nothing() -> None:
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc")
        servicer = KVTransferServicer(source.store, source.leases, KVTransferConfig())
        async with serving(servicer) as address:
            for wrong in (b"", bytes(32), source.secrets["req"][:16]):
                stolen = source.handle(address, secret=wrong)  # a guessed request id, no secret
                await expect_failure(
                    transport.pull(stolen, (10, 11), (1, 2), dest, TIMEOUT_S),
                    FailureReason.REFUSED,
                    "NOT_FOUND: no lease for request 'req' (unknown request id, or not its secret)",
                )
                assert await transport.release(stolen, TIMEOUT_S) is False
            assert (servicer.num_pulls_served, servicer.bytes_served) == (0, 0)  # nothing was read
            assert_untouched(dest, before)
            assert len(source.leases) == 1 and source.freed == []  # nothing was released
            handle = source.handle(address)  # its holder still pulls and releases it
            stats = await transport.pull(handle, (10, 11), (1, 2), dest, TIMEOUT_S)
            assert (servicer.num_pulls_served, servicer.bytes_served) == (1, stats.bytes_moved)
            assert_moved(source.store, (10, 11), dest, (1, 2), before)
            assert await transport.release(handle, TIMEOUT_S) is True
        await transport.close()

    asyncio.run(main())
    assert source.freed == ["req"] and len(source.leases) == 0


class StallingServicer(KVTransferServicer):
    """Blocks in the first chunk's encoding until `go` is set (the lease stays checked out)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.reading, self.go = threading.Event(), threading.Event()

    def encode_chunk(self, reader: PackedReader, offset_bytes: int, size_bytes: int) -> bytes:
        self.reading.set()
        self.go.wait(TIMEOUT_S)
        return super().encode_chunk(reader, offset_bytes, size_bytes)


def test_release_during_a_pull_waits_for_the_pull_then_frees() -> None:
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()
    before = snapshot(dest)
    servicer = StallingServicer(source.store, source.leases, KVTransferConfig())

    async def main() -> None:
        transport = create_transport("grpc")
        async with serving(servicer) as address:
            handle = source.handle(address)
            pull = asyncio.ensure_future(transport.pull(handle, LEASED, tuple(range(40, 70)), dest, TIMEOUT_S))
            assert await asyncio.to_thread(servicer.reading.wait, TIMEOUT_S)
            assert await transport.release(handle, TIMEOUT_S) is True
            assert source.freed == []  # deferred: the pull is reading the blocks
            servicer.go.set()
            await pull
            assert source.freed == ["req"]
            assert_moved(source.store, LEASED, dest, tuple(range(40, 70)), before)
        await transport.close()

    asyncio.run(main())


def test_grpc_timeout_and_unavailable_peer_are_bounded() -> None:
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()
    servicer = StallingServicer(source.store, source.leases, KVTransferConfig())

    async def main() -> None:
        transport = create_transport("grpc")
        started = time.monotonic()
        await expect_failure(
            transport.pull(source.handle(f"127.0.0.1:{closed_port()}"), (10,), (1,), dest, 2.0),
            FailureReason.PEER_UNAVAILABLE,
            "UNAVAILABLE",
        )
        assert time.monotonic() - started < 2.0 and len(transport.channels) == 0  # the dead channel is dropped
        async with serving(servicer) as address:
            started = time.monotonic()
            await expect_failure(
                transport.pull(source.handle(address), (10,), (1,), dest, 0.5),
                FailureReason.TIMEOUT,
                "DEADLINE_EXCEEDED",
            )
            assert time.monotonic() - started < 2.0
            servicer.go.set()
        await transport.close()

    asyncio.run(main())


# ---- torch transport ----------------------------------------------------------------------------
@dataclass
class RemoteSource:
    layout: KVLayout
    address: str
    process: ChildProcess

    def handle(
        self, request_id: str = "remote", layout: KVLayout | None = None, secret: bytes | None = None
    ) -> KVHandle:
        """The handle of the source's lease, with its secret (from the ready line) unless given."""
        blocks = tuple(range(NUM_BLOCKS))
        return KVHandle(
            request_id,
            "prefill-remote",
            self.address,
            blocks,
            NUM_BLOCKS * 16,
            layout or self.layout,
            synthetic_block_hashes(blocks),
            time.time() + 60,
            source_lease_secret(self.process) if secret is None else secret,
        )


@pytest.fixture(scope="module")
def remote_sources() -> Iterator[dict[str, RemoteSource]]:
    """One source process per dtype (started together), holding lease "remote" over every block."""
    layouts = {dtype: make_layout(dtype) for dtype in ("float32", "bfloat16")}
    processes = {
        dtype: ChildProcess.spawn(f"kv-source-{dtype}", source_args(layout, NUM_BLOCKS, 5, "torch", "remote"))
        for dtype, layout in layouts.items()
    }
    try:
        wait_all_ready(list(processes.values()), timeout_s=60.0)
        yield {dtype: RemoteSource(layouts[dtype], p.address, p) for dtype, p in processes.items()}
    finally:
        for process in processes.values():
            process.terminate()  # all at once
        assert [process.stop(10.0) for process in processes.values()] == [0, 0]  # each exits cleanly on SIGTERM


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_pull_from_a_source_process_is_exact_and_reuses_its_pair(remote_sources, dtype: str) -> None:
    remote = remote_sources[dtype]
    expected = KVBlockStore(random_kv_caches(remote.layout, NUM_BLOCKS, 5), remote.layout)
    dest = make_dest(remote.layout)
    before = snapshot(dest)

    async def main() -> None:
        # the source process requires the session's cluster token (it inherits it)
        transport = create_transport("torch", KVTransferConfig(transport="torch", token=cluster_token()))
        src_ids = (3, 4, 5, 6, 40, 41, 42, 80)
        dst_ids = (90, 91, 92, 93, 0, 1, 2, 50)
        stats = await transport.pull(remote.handle(), src_ids, dst_ids, dest, TIMEOUT_S)
        assert stats.bytes_moved == len(src_ids) * dest.bytes_per_block and stats.num_blocks == len(src_ids)
        assert_moved(expected, src_ids, dest, dst_ids, before)
        src_ids, dst_ids = tuple(range(20, 60)), tuple(range(20, 60))  # one run: sent from the cache
        before_second = snapshot(dest)
        await transport.pull(remote.handle(), src_ids, dst_ids, dest, TIMEOUT_S)
        assert_moved(expected, src_ids, dest, dst_ids, before_second)
        assert len(transport._pairs) == 1  # formed once, reused
        await expect_failure(
            transport.pull(remote.handle("ghost"), (1,), (1,), dest, TIMEOUT_S),
            FailureReason.REFUSED,
            "no lease for request 'ghost' (unknown request id, or not its secret)",
        )
        before_third = snapshot(dest)
        await transport.pull(remote.handle(), (7,), (7,), dest, TIMEOUT_S)  # a fresh pair after the refusal
        assert_moved(expected, (7,), dest, (7,), before_third)
        before_wrong = snapshot(dest)
        await expect_failure(  # the right request id without the handle's secret: nothing is sent
            transport.pull(remote.handle(secret=bytes(32)), (1,), (1,), dest, TIMEOUT_S),
            FailureReason.REFUSED,
            "no lease for request 'remote' (unknown request id, or not its secret)",
        )
        assert_untouched(dest, before_wrong)
        await transport.pull(remote.handle(), (8,), (8,), dest, TIMEOUT_S)  # its holder still pulls it
        assert_moved(expected, (8,), dest, (8,), before_wrong)
        before_forged = snapshot(dest)
        genuine = remote.handle()
        forged = dataclasses.replace(genuine, block_hashes=tuple(h + 1 for h in genuine.block_hashes))
        await expect_failure(  # the handle and secret, claiming other hashes: nothing is sent
            transport.pull(forged, (1,), (1,), dest, TIMEOUT_S),
            FailureReason.HASH_MISMATCH,
            "FAILED_PRECONDITION: block hashes differ from the lease's for request 'remote': "
            "block 1 has hash 0x0000b10c00000001, the receiver expects 0x0000b10c00000002",
        )
        assert_untouched(dest, before_forged)
        await transport.pull(genuine, (9,), (9,), dest, TIMEOUT_S)  # with its own hashes
        assert_moved(expected, (9,), dest, (9,), before_forged)
        # a pull whose caller skipped `KVHandle.check`: the source refuses the receiver's layout
        # (last: a refusal while a new pair forms leaves that pair to time out)
        other = make_dest(make_layout(dtype, block_size=32))
        before_other = snapshot(other)
        await expect_failure(
            transport.pull(remote.handle(), (1,), (1,), other, TIMEOUT_S),
            FailureReason.LAYOUT_MISMATCH,
            "block_size (ours 16, theirs 32)",
        )
        assert_untouched(other, before_other)
        await transport.close()

    asyncio.run(main())


class CorruptingTorchServicer(TorchKVServicer):
    """Flips one byte of the first message on the wire (after it was hashed)."""

    def wire_view(self, view: torch.Tensor, index: int) -> torch.Tensor:
        if index:
            return view
        corrupted = view.clone()
        corrupted[7] ^= 0x10
        return corrupted


def test_torch_checksum_mismatch_and_peer_loss_in_process() -> None:
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("torch")
        async with serving(CorruptingTorchServicer(source.store, source.leases, KVTransferConfig())) as address:
            await expect_failure(
                transport.pull(source.handle(address), LEASED[:4], (1, 2, 3, 4), dest, TIMEOUT_S),
                FailureReason.CHECKSUM,
                "xxh64",
            )
        assert_untouched(dest, before)
        started = time.monotonic()  # the source is gone now: no hang, and the pair is torn down
        await expect_failure(
            transport.pull(source.handle(address), LEASED[:4], (1, 2, 3, 4), dest, 3.0), FailureReason.PEER_UNAVAILABLE
        )
        assert time.monotonic() - started < 3.0 and transport._pairs == {}
        await transport.close()

    asyncio.run(main())
    assert_untouched(dest, before)


def test_torch_pairs_are_replaced_not_leaked_in_process() -> None:
    source, dest = make_source(make_layout("bfloat16")), make_dest(make_layout("bfloat16"))
    source.grant()
    servicer = TorchKVServicer(source.store, source.leases, KVTransferConfig())

    async def main() -> None:
        transport = create_transport("torch")
        async with serving(servicer) as address:
            before = snapshot(dest)
            await transport.pull(source.handle(address), LEASED[:6], tuple(range(6)), dest, TIMEOUT_S)
            assert_moved(source.store, LEASED[:6], dest, tuple(range(6)), before)
            (first_pair,) = servicer._pairs
            await expect_failure(
                transport.pull(source.handle(address, request_id="ghost"), (10,), (1,), dest, TIMEOUT_S),
                FailureReason.REFUSED,
                "unknown request id",
            )
            assert transport._pairs == {}  # the receiver tore its pair down
            before = snapshot(dest)
            await transport.pull(source.handle(address), LEASED[6:], tuple(range(6, 30)), dest, TIMEOUT_S)
            assert_moved(source.store, LEASED[6:], dest, tuple(range(6, 30)), before)
            (second_pair,) = servicer._pairs  # the source replaced the old pair with the new one
            assert second_pair != first_pair and len(transport._pairs) == 1
        await transport.close()

    asyncio.run(main())
