"""The tcp KV transport (kvtransfer/tcp_*.py) over real sockets.

Control on gRPC, bytes on a dedicated TCP connection: exact bytes from cache blocks into cache
blocks; refusals before any ticket exists; a data connection that does not present a live
ticket's token gets nothing; header checks; a corrupted byte, a short read, a source killed
mid-transfer, a receiver killed mid-transfer, a cancelled pull and a stalled source each give
a clear error, unpin the lease and leave the source serving. Sources run in this process (one
event loop; the listener and senders are threads) or, for the kill tests, as child processes.
Last, a real prefill and decode worker pair on this transport is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import crc32c
import pytest
import torch

from tandem.common import kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.engine import Engine, SamplingParams
from tandem.kvtransfer import tcp_listener, tcp_wire
from tandem.kvtransfer.base import FailureReason, KVTransferError, create_transport
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.tcp_source import TcpKVServicer, TcpSourceCounters
from tandem.kvtransfer.tcp_transport import TcpTransport
from tandem.kvtransfer.torch_pairs import parse_address
from tandem.loadtest.bench.kv_source import random_kv_caches, synthetic_block_hashes
from tests.conftest import random_prompts
from tests.integration.test_kvtransfer import (
    TIMEOUT_S,
    FakeClock,
    Source,
    assert_moved,
    assert_untouched,
    expect_failure,
    make_dest,
    make_layout,
    make_source,
    serving,
    snapshot,
)
from tests.integration.workers import (
    REPO_ROOT,
    STOP_TIMEOUT_S,
    disaggregated,
    metric_sum,
    metrics_port,
    start_worker,
    wait_until,
    worker_health,
    worker_metric,
)

# 8 KiB per block and plane, 8 planes: a 96-block pull is 6 MiB, planes of 768 KiB (two batches)
BIG = KVLayout("llama", num_layers=4, num_kv_heads=4, head_dim=64, dtype="bfloat16", block_size=16)
HELD = tuple(range(96))


def tcp_pair(layout: KVLayout = BIG, servicer_cls: type[TcpKVServicer] = TcpKVServicer) -> tuple[Source, TcpKVServicer]:
    """A source holding lease "req" over every block, and its tcp servicer (not yet serving)."""
    source = make_source(layout)
    source.grant(blocks=HELD)
    return source, servicer_cls(source.store, source.leases, KVTransferConfig(transport="tcp"))


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[TcpTransport]:
    transport = create_transport("tcp")
    assert isinstance(transport, TcpTransport)
    try:
        yield transport
    finally:
        await transport.close()


async def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def packed(store: KVBlockStore, block_ids: tuple[int, ...]) -> bytes:
    return store.pack(block_ids).view(torch.uint8).numpy().tobytes()


async def ticket_for(transport: TcpTransport, handle: KVHandle, block_ids: tuple[int, ...]) -> kv_codec.TcpTicket:
    """A ticket got the way the transport gets one (PullKVTcp), for a hand-made connection."""
    call = transport.channels.unary(
        handle.source_address, "PullKVTcp", kv_codec.pull_kv_request_to_bytes, kv_codec.tcp_ticket_from_bytes
    )
    hashes = synthetic_block_hashes(block_ids)
    request = kv_codec.PullKVRequest(
        handle.request_id, block_ids, handle.layout.describe(), 0, handle.lease_secret, hashes
    )
    return await call(request, timeout=TIMEOUT_S)


def connect(ticket: kv_codec.TcpTicket, first_bytes: bytes) -> socket.socket:
    sock = socket.create_connection(parse_address(ticket.address), timeout=TIMEOUT_S)
    sock.sendall(first_bytes)
    return sock


def read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size and (chunk := sock.recv(size - got)):
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def until_closed(sock: socket.socket) -> bytes:
    """What the source sends until it closes the connection (also when it closes it with our
    bytes unread, which resets it)."""
    chunks = []
    try:
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


# ---- the wire -----------------------------------------------------------------------------------
def test_block_views_are_the_packed_layout_and_batches_cut_it_in_order() -> None:
    store = make_source(make_layout()).store  # 4 KiB per block and plane, 4 planes
    ids = (5, 6, 7, 20, 21, 3)
    views = tcp_wire.block_views(store, ids)
    assert [len(v) for v in views] == [3 * 4096, 2 * 4096, 4096] * 4
    assert b"".join(bytes(v) for v in views) == packed(store, ids)
    big = [memoryview(bytearray(tcp_wire.PIECE_BYTES + 10)), memoryview(bytearray(100))]
    assert [[len(p) for p in b] for b in tcp_wire.batches(big)] == [[tcp_wire.PIECE_BYTES], [10, 100]]
    many = [memoryview(bytearray(8))] * (tcp_wire.MAX_IOV + 1)
    assert [len(b) for b in tcp_wire.batches(many)] == [tcp_wire.MAX_IOV, 1]


def test_every_header_field_is_checked_before_a_byte_lands() -> None:
    layout, peer = make_layout(), "10.0.0.9:7000"
    fingerprint = tcp_wire.fingerprint_bytes(layout)
    ok = tcp_wire.Header(tcp_wire.Status.OK, 3, 3 * 16384, fingerprint)
    cases = [
        (
            dataclasses.replace(ok, fingerprint=bytes(8)),
            FailureReason.LAYOUT_MISMATCH,
            f"{peer}: the source's layout fingerprint 0000000000000000 is not ours ({layout.fingerprint})",
        ),
        (
            dataclasses.replace(ok, num_blocks=4),
            FailureReason.PROTOCOL,
            f"{peer}: the source sends 4 blocks in 49152 bytes; we asked for 3 blocks in 49152 bytes",
        ),
        (
            dataclasses.replace(ok, size_bytes=1 << 40),
            FailureReason.PROTOCOL,
            f"{peer}: the source sends 3 blocks in {1 << 40} bytes; we asked for 3 blocks in 49152 bytes",
        ),
        (
            tcp_wire.Header(tcp_wire.Status.REFUSED, 0, 0, fingerprint, "the lease for request 'r' was released"),
            FailureReason.REFUSED,
            f"{peer}: the lease for request 'r' was released",
        ),
    ]
    for header, reason, message in cases:
        left, right = socket.socketpair()
        with left, right:
            left.sendall(header.encode())
            parsed = tcp_wire.read_header(right, time.monotonic() + 5, peer)
            assert parsed == header
            with pytest.raises(KVTransferError) as info:
                tcp_wire.check_header(parsed, 3, 3 * 16384, layout, peer)
            assert (info.value.reason, info.value.args[0]) == (reason, message)
    tcp_wire.check_header(ok, 3, 3 * 16384, layout, peer)
    for raw in (b"HTTP" + ok.encode()[4:], tcp_wire.HEADER.pack(tcp_wire.MAGIC, 9, 0, 3, 0, fingerprint)):
        left, right = socket.socketpair()
        with left, right:
            left.sendall(raw)
            with pytest.raises(KVTransferError) as info:
                tcp_wire.read_header(right, time.monotonic() + 5, peer)
            assert info.value.reason is FailureReason.PROTOCOL and "malformed KV header" in str(info.value)


# ---- pulls --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_pull_is_exact_from_cache_blocks_into_cache_blocks(dtype: str) -> None:
    source, servicer = tcp_pair(dataclasses.replace(BIG, dtype=dtype))
    dest = make_dest(source.store.layout)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            handle = source.handle(address, blocks=HELD)
            # a fresh prompt (one run) into a pool after churn (shuffled runs of 20)
            src_ids, dst_ids = tuple(range(60)), (*range(60, 80), *range(0, 20), *range(30, 50))
            before = snapshot(dest)
            stats = await transport.pull(handle, src_ids, dst_ids, dest, TIMEOUT_S)
            assert (stats.transport, stats.bytes_moved, stats.num_blocks) == ("tcp", 60 * dest.bytes_per_block, 60)
            assert stats.num_chunks == 3 * dest.num_planes  # one view per destination run and plane
            assert_moved(source.store, src_ids, dest, dst_ids, before)
            # scattered source blocks into single destination blocks in reverse order
            src_ids, dst_ids = tuple(range(60, 96, 2)), tuple(range(95, 77, -1))
            before = snapshot(dest)
            stats = await transport.pull(handle, src_ids, dst_ids, dest, TIMEOUT_S)
            assert stats.num_chunks == 18 * dest.num_planes
            assert_moved(source.store, src_ids, dest, dst_ids, before)
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(served=2))
            assert servicer._tickets == {}  # each ticket was used once
            assert len(transport.kept) == 1  # both pulls went over one connection, kept for the next
            assert source.freed == []
            assert await transport.release(handle, TIMEOUT_S) is True

    asyncio.run(main())
    assert source.freed == ["req"] and len(source.leases) == 0


def test_refusals_name_the_problem_and_issue_no_ticket() -> None:
    source, servicer = tcp_pair()
    dest = make_dest(BIG)
    before = snapshot(dest)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            genuine = source.handle(address, blocks=HELD)
            unknown = "NOT_FOUND: no lease for request '{}' (unknown request id, or not its secret)"
            for handle, reason, message in [
                (source.handle(address, "ghost", blocks=HELD), FailureReason.REFUSED, unknown.format("ghost")),
                (source.handle(address, blocks=HELD, secret=bytes(32)), FailureReason.REFUSED, unknown.format("req")),
                (
                    dataclasses.replace(genuine, block_hashes=tuple(h ^ 1 for h in genuine.block_hashes)),
                    FailureReason.HASH_MISMATCH,
                    "FAILED_PRECONDITION: block hashes differ from the lease's for request 'req': "
                    "block 1 has hash 0x0000b10c00000001, the receiver expects 0x0000b10c00000000",
                ),
            ]:
                await expect_failure(transport.pull(handle, (1, 2), (5, 6), dest, TIMEOUT_S), reason, message)
            other = make_dest(dataclasses.replace(BIG, block_size=32))
            await expect_failure(
                transport.pull(genuine, (1,), (1,), other, TIMEOUT_S),
                FailureReason.LAYOUT_MISMATCH,
                "block_size (ours 16, theirs 32)",
            )
            assert servicer._tickets == {} and servicer.counters == TcpSourceCounters()

    asyncio.run(main())
    assert_untouched(dest, before)
    assert source.freed == [] and len(source.leases) == 1


class CallCountingServicer(TcpKVServicer):
    """Counts its PullKVTcp calls (a pull in band makes none)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.calls = 0

    async def PullKVTcp(self, request: kv_codec.PullKVRequest, context: object) -> kv_codec.TcpTicket:
        self.calls += 1
        return await super().PullKVTcp(request, context)  # type: ignore[arg-type]


def test_a_pull_on_a_kept_connection_goes_in_band_and_a_refusal_there_says_why() -> None:
    source, servicer = tcp_pair(servicer_cls=CallCountingServicer)
    assert isinstance(servicer, CallCountingServicer)
    dest = make_dest(BIG)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            handle = source.handle(address, blocks=HELD)
            await transport.pull(handle, (1,), (1,), dest, TIMEOUT_S)  # a first pull: call, then connect
            assert len(transport.kept) == 1 and servicer.address in transport.kept and servicer.calls == 1
            # the request goes on the kept connection, no call; the source refuses it there, as the call would
            await expect_failure(
                transport.pull(source.handle(address, "ghost", blocks=HELD), (2,), (2,), dest, TIMEOUT_S),
                FailureReason.REFUSED,
                f"{servicer.address}: NOT_FOUND: no lease for request 'ghost' (unknown request id, or not its secret)",
            )
            assert len(transport.kept) == 0 and servicer.calls == 1  # that connection was closed, not kept
            before = snapshot(dest)
            await transport.pull(handle, (3, 4), (5, 6), dest, TIMEOUT_S)  # anew, with a call, then kept again
            await transport.pull(handle, (7, 8), (9, 10), dest, TIMEOUT_S)  # in band
            assert_moved(source.store, (3, 4, 7, 8), dest, (5, 6, 9, 10), before)
            assert len(transport.kept) == 1 and servicer.calls == 2
            await wait_for(lambda: servicer.counters == TcpSourceCounters(served=3))
            assert servicer.counters == TcpSourceCounters(served=3), servicer.counters
            assert servicer._tickets == {} and servicer.bytes_served == 5 * source.store.bytes_per_block

    asyncio.run(main())


def test_a_kept_connection_the_source_closed_is_replaced(monkeypatch) -> None:
    monkeypatch.setattr(tcp_listener, "IDLE_TIMEOUT_S", 0.2)
    source, servicer = tcp_pair()
    dest = make_dest(BIG)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            handle = source.handle(address, blocks=HELD)
            await transport.pull(handle, (1,), (1,), dest, TIMEOUT_S)
            await asyncio.sleep(0.6)  # the source closes the idle connection; the receiver still keeps it
            assert len(transport.kept) == 1
            before = snapshot(dest)
            await transport.pull(handle, (2, 3), (4, 5), dest, TIMEOUT_S)  # found closed: once more, anew
            assert_moved(source.store, (2, 3), dest, (4, 5), before)
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(served=2))

    asyncio.run(main())


def test_a_connection_without_a_live_token_gets_nothing(monkeypatch) -> None:
    monkeypatch.setattr(tcp_listener, "TOKEN_TIMEOUT_S", 0.3)
    source, servicer = tcp_pair()
    ids = (3, 4, 5)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            ticket = await ticket_for(transport, source.handle(address, blocks=HELD), ids)
            assert ticket.size_bytes == 3 * source.store.bytes_per_block and len(servicer._tickets) == 1
            ticket_id = ticket.token[: tcp_wire.TICKET_ID_BYTES]
            wrong = [
                os.urandom(kv_codec.TCP_TOKEN_BYTES),  # no ticket's id
                ticket_id + bytes(32),  # the ticket's id, another secret
                b"",  # nothing within TOKEN_TIMEOUT_S
            ]
            for first_bytes in wrong:
                with connect(ticket, first_bytes) as sock:
                    assert await asyncio.to_thread(read_to_end, sock) == b""  # closed, no byte sent
            assert await wait_for(lambda: servicer.counters.refused_connections == 3)
            header = tcp_wire.Header(tcp_wire.Status.OK, 3, ticket.size_bytes, tcp_wire.fingerprint_bytes(BIG)).encode()
            data = packed(source.store, ids)
            expected = header + data + tcp_wire.TRAILER.pack(crc32c.crc32c(data))
            with connect(ticket, ticket.token) as sock:  # its holder still uses it
                got = await asyncio.to_thread(read_exactly, sock, len(expected))
                assert got == expected  # and the connection stays open for the next pull
                sock.sendall(ticket.token)  # once: the same token again is refused (not a request), and closes it
                assert await asyncio.to_thread(until_closed, sock) == b""
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(served=1, refused_connections=4))

    asyncio.run(main())


def test_a_lease_that_ended_after_the_ticket_is_refused_in_the_header() -> None:
    source, servicer = tcp_pair()

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            ticket = await ticket_for(transport, source.handle(address, blocks=HELD), (3,))
            assert source.leases.release("req", source.secrets["req"]) is True
            with connect(ticket, ticket.token) as sock:
                header = await asyncio.to_thread(tcp_wire.read_header, sock, time.monotonic() + TIMEOUT_S, "p")
                sock.shutdown(socket.SHUT_WR)  # the source then closes the connection it kept
                assert await asyncio.to_thread(read_to_end, sock) == b""  # with nothing after the header
            assert (header.status, header.error) == (
                tcp_wire.Status.REFUSED,
                "the lease for request 'req' was released",
            )

    asyncio.run(main())
    assert source.freed == ["req"]


class CorruptingServicer(TcpKVServicer):
    """Flips byte 7 of the first view on the wire, after it was hashed."""

    def send_blocks(
        self, sock: socket.socket, views: list[memoryview], deadline_s: float, committed: object = None
    ) -> int:
        first = bytearray(views[0])
        first[7] ^= 0x10
        tcp_wire.send_views(sock, [memoryview(first), *views[1:]], deadline_s)
        return tcp_wire.checksum(views)


class CuttingServicer(TcpKVServicer):
    """Sends the first half of the bytes, then drops the connection."""

    def send_blocks(
        self, sock: socket.socket, views: list[memoryview], deadline_s: float, committed: object = None
    ) -> int:
        flat = b"".join(bytes(v) for v in views)
        sock.sendall(flat[: len(flat) // 2])
        sock.shutdown(socket.SHUT_RDWR)
        raise ConnectionAbortedError("cut for the test")


def test_a_corrupted_byte_is_a_checksum_error_and_the_lease_is_unpinned() -> None:
    source, servicer = tcp_pair(servicer_cls=CorruptingServicer)
    dest = make_dest(BIG)
    src_ids, dst_ids = tuple(range(40)), (*range(50, 70), *range(0, 20))
    before = snapshot(dest)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            await expect_failure(
                transport.pull(source.handle(address, blocks=HELD), src_ids, dst_ids, dest, TIMEOUT_S),
                FailureReason.CHECKSUM,
                f"{servicer.address}: received {40 * dest.bytes_per_block} bytes with crc32c",
            )

    asyncio.run(main())
    others = [b for b in range(dest.num_blocks) if b not in set(dst_ids)]
    assert all(torch.equal(d[:, others], old[:, others]) for d, old in zip(dest.kv_caches, before))
    # received in place: the flipped byte (layer 0, K, destination block 50) landed as sent
    got = dest.kv_caches[0][0, 50].reshape(-1).view(torch.uint8)
    assert int(got[7]) == int(source.store.kv_caches[0][0, 0].reshape(-1).view(torch.uint8)[7]) ^ 0x10
    assert source.leases.release("req", source.secrets["req"]) is True
    assert source.freed == ["req"]  # freed at once: no pull pins it any more


def test_a_source_that_closes_early_is_a_short_read_and_keeps_serving() -> None:
    source, servicer = tcp_pair(servicer_cls=CuttingServicer)
    dest = make_dest(BIG)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            handle = source.handle(address, blocks=HELD)
            error = await expect_failure(
                transport.pull(handle, HELD, HELD, dest, TIMEOUT_S), FailureReason.PEER_UNAVAILABLE
            )
            half = 96 * dest.bytes_per_block // 2
            assert str(error) == (
                f"peer_unavailable: {servicer.address}: the source closed the KV connection after {half} bytes "
                "(short read)"
            )
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(failed_sends=1))
            servicer.send_blocks = functools.partial(TcpKVServicer.send_blocks, servicer)  # type: ignore[method-assign]
            before = snapshot(dest)
            await transport.pull(handle, (1, 2), (7, 8), dest, TIMEOUT_S)  # the source still serves
            assert_moved(source.store, (1, 2), dest, (7, 8), before)

    asyncio.run(main())


class StallingServicer(TcpKVServicer):
    """Sends the first half of the bytes, then waits for `go` before sending the rest."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.halfway, self.go = threading.Event(), threading.Event()

    def send_blocks(
        self, sock: socket.socket, views: list[memoryview], deadline_s: float, committed: object = None
    ) -> int:
        flat = b"".join(bytes(v) for v in views)
        sock.sendall(flat[: len(flat) // 2])
        self.halfway.set()
        self.go.wait(TIMEOUT_S)
        sock.settimeout(TIMEOUT_S)
        sock.sendall(flat[len(flat) // 2 :])
        return crc32c.crc32c(flat)


def test_a_stalled_source_is_a_bounded_timeout_and_a_cancelled_pull_stops_writing() -> None:
    source, servicer = tcp_pair(servicer_cls=StallingServicer)
    assert isinstance(servicer, StallingServicer)
    dest = make_dest(BIG)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            handle = source.handle(address, blocks=HELD)
            started = time.monotonic()
            await expect_failure(
                transport.pull(handle, HELD, HELD, dest, 1.0), FailureReason.TIMEOUT, "did not arrive in time"
            )
            assert time.monotonic() - started < 3.0
            servicer.go.set()  # the rest finds the receiver gone
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(failed_sends=1))
            servicer.go.clear()
            servicer.halfway.clear()
            pull = asyncio.ensure_future(transport.pull(handle, HELD, HELD, dest, TIMEOUT_S))
            assert await asyncio.to_thread(servicer.halfway.wait, TIMEOUT_S)
            await asyncio.sleep(0.1)  # the first half lands
            started = time.monotonic()
            pull.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pull
            assert time.monotonic() - started < 2.0
            after_cancel = snapshot(dest)
            servicer.go.set()
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(failed_sends=2))
            assert_untouched(dest, after_cancel)  # nothing written once the pull ended

    asyncio.run(main())
    assert source.leases.release("req", source.secrets["req"]) is True and source.freed == ["req"]


@pytest.mark.gpu
def test_pull_between_cuda_caches_goes_through_pinned_host_buffers() -> None:
    """On CUDA the source packs into pinned host staging and the receiver unpacks from one after
    the checksum matched (no socket I/O from device memory), for a first pull and for one in
    band. Only a GPU run proves this path."""
    clock, freed = FakeClock(), list[str]()
    store = KVBlockStore(random_kv_caches(BIG, len(HELD), 1, "cuda"), BIG)
    source = Source(store, LeaseTable(freed.append, clock), clock, freed)
    source.grant(blocks=HELD)
    servicer = TcpKVServicer(store, source.leases, KVTransferConfig(transport="tcp"))
    dest = KVBlockStore(random_kv_caches(BIG, len(HELD), 99, "cuda"), BIG)
    src_ids, dst_ids = tuple(range(60)), (*range(60, 80), *range(0, 20), *range(30, 50))
    before = snapshot(dest)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            stats = await transport.pull(source.handle(address, blocks=HELD), src_ids, dst_ids, dest, TIMEOUT_S)
            assert stats.num_chunks == 1  # one pinned host buffer
            assert transport.staging.idle_bytes >= 60 * dest.bytes_per_block  # given back
            assert len(transport.kept) == 1  # the next pull goes in band, through the same buffers
            stats = await transport.pull(source.handle(address, blocks=HELD), (90, 91), (90, 91), dest, TIMEOUT_S)
            assert stats.num_chunks == 1
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(served=2))

    asyncio.run(main())
    assert_moved(store, (*src_ids, 90, 91), dest, (*dst_ids, 90, 91), before)


# ---- process death ------------------------------------------------------------------------------
@contextlib.contextmanager
def source_process(*extra: str) -> Iterator[dict]:
    argv = [sys.executable, "-m", "tests.integration.tcp_source", BIG.describe(), str(len(HELD)), *extra]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield {**json.loads(proc.stdout.readline()), "proc": proc}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def remote_handle(ready: dict) -> KVHandle:
    return KVHandle(
        "req",
        "prefill-0",
        ready["address"],
        HELD,
        len(HELD) * 16,
        BIG,
        synthetic_block_hashes(HELD),
        time.time() + 60,
        bytes.fromhex(ready["lease_secret"]),
    )


def test_a_source_killed_mid_transfer_is_a_prompt_clear_failure() -> None:
    dest = make_dest(BIG)

    async def main(ready: dict) -> None:
        async with receiver() as transport:
            pull = asyncio.ensure_future(transport.pull(remote_handle(ready), HELD, HELD, dest, 30.0))
            proc = ready["proc"]
            assert await asyncio.to_thread(lambda: json.loads(proc.stdout.readline())) == {"event": "sending"}
            started = time.monotonic()
            os.kill(ready["pid"], signal.SIGKILL)
            error = await expect_failure(pull, FailureReason.PEER_UNAVAILABLE, "(short read)")
            assert time.monotonic() - started < 5.0, str(error)
            # the next pull from the dead source fails at once too
            await expect_failure(
                transport.pull(remote_handle(ready), (1,), (1,), dest, 5.0), FailureReason.PEER_UNAVAILABLE
            )

    with source_process("hang") as ready:
        asyncio.run(main(ready))


RECEIVER = """
import json, socket, sys
import grpc
from tandem.common import kv_codec
from tandem.kvtransfer import tcp_wire
from tandem.kvtransfer.torch_pairs import parse_address
ids = tuple(range(96))
request = kv_codec.PullKVRequest("req", ids, sys.argv[2], 0, bytes.fromhex(sys.argv[3]),
                                 tuple(int(h) for h in sys.argv[4].split(",")))
call = grpc.insecure_channel(sys.argv[1]).unary_unary(
    "/tandem.v1.KVTransfer/PullKVTcp", kv_codec.pull_kv_request_to_bytes, kv_codec.tcp_ticket_from_bytes)
ticket = call(request, timeout=10)
sock = socket.create_connection(parse_address(ticket.address))
sock.sendall(ticket.token)
sock.recv(tcp_wire.HEADER.size, socket.MSG_WAITALL)
print(json.dumps({"event": "receiving"}), flush=True)
sys.stdin.read()  # killed here, having read the header only: the source cannot finish
"""


def test_a_receiver_killed_mid_transfer_unpins_the_lease_and_the_source_keeps_serving() -> None:
    # 96 blocks of 16 KiB per plane (24 MiB): far more than the kernel buffers an unread
    # connection, so the source is still sending when the receiver dies
    layout = dataclasses.replace(BIG, head_dim=128, num_layers=8)
    source, servicer = tcp_pair(layout)
    dest = make_dest(layout)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            hashes = ",".join(str(h) for h in synthetic_block_hashes(HELD))
            argv = [sys.executable, "-c", RECEIVER, address, layout.describe(), source.secrets["req"].hex(), hashes]
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout is not None
                line = await asyncio.to_thread(proc.stdout.readline)
                assert json.loads(line) == {"event": "receiving"}
                await asyncio.sleep(0.3)  # the source fills the buffers and blocks
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(failed_sends=1))
            before = snapshot(dest)
            handle = source.handle(address, blocks=HELD)
            await transport.pull(handle, HELD, HELD, dest, TIMEOUT_S)  # the source still serves
            assert_moved(source.store, HELD, dest, HELD, before)
            assert await transport.release(handle, TIMEOUT_S) is True

    asyncio.run(main())
    assert source.freed == ["req"]  # freed at once: neither pull pins it any more


# ---- a real prefill + decode pair -----------------------------------------------------------
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tcp_workers(tiny_model_dir: Path):
    common = ("--kv-transport", "tcp", "--no-kv-shm")  # the pair shares a host: force the network
    p = start_worker("prefill", tiny_model_dir, *common, worker_id="p-tcp")
    d = start_worker("decode", tiny_model_dir, *common, worker_id="d-tcp")
    yield p, d
    for w in (d, p):
        assert w.stop(STOP_TIMEOUT_S) == 0


def test_prefill_decode_pair_over_tcp_is_exact(tcp_workers, tiny_model_dir: Path) -> None:
    p, d = tcp_workers
    reference = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    lengths = [1, 16, 17, 40, 100]
    prompts = random_prompts(lengths, reference.model_config.vocab_size, seed=41)
    expected = [list(o.token_ids) for o in reference.generate(prompts, GREEDY)]
    for i, prompt in enumerate(prompts):
        tokens, deltas = disaggregated(p, d, f"tcp-{i}", prompt, GREEDY)
        assert tokens == expected[i], f"prompt {i} ({len(prompt)} tokens)"
        assert deltas[0].recomputed is False and deltas[0].num_pulled_blocks == len(prompt) // 16
    url = f"http://127.0.0.1:{metrics_port(d)}/metrics"
    pulled = sum(1 for n in lengths if n >= 16)
    assert metric_sum(url, "tandem_kv_pulls_total", transport="tcp") == pulled
    assert worker_metric(d, "tandem_kv_transfer_failures_total") == 0

    def drained() -> bool:
        return all((h := worker_health(w)).free_blocks == h.total_blocks and h.held_leases == 0 for w in (p, d))

    assert wait_until(drained, 5.0)


def test_a_lease_granted_while_serving_is_sent_unhashed_and_a_block_changed_since_fails_closed(monkeypatch) -> None:
    source = make_source(BIG)
    servicer = TcpKVServicer(source.store, source.leases, KVTransferConfig(transport="tcp"))
    source.grant(blocks=HELD)  # after the servicer attached its digests, as in a prefill worker
    dest = make_dest(BIG)
    src_ids, dst_ids = tuple(range(40)), (*range(50, 70), *range(0, 20))

    def no_pull_time_hash(*_: object) -> int:
        raise AssertionError("the source hashed its blocks again")

    monkeypatch.setattr(tcp_wire, "checksum", no_pull_time_hash)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            handle = source.handle(address, blocks=HELD)
            before = snapshot(dest)
            await transport.pull(handle, src_ids, dst_ids, dest, TIMEOUT_S)
            assert_moved(source.store, src_ids, dest, dst_ids, before)
            source.store.kv_caches[2][0, 33].view(torch.uint8).view(-1)[5] ^= 0x40  # changed after the grant
            await expect_failure(
                transport.pull(handle, src_ids, dst_ids, dest, TIMEOUT_S),
                FailureReason.CHECKSUM,
                f"{servicer.address}: received {40 * dest.bytes_per_block} bytes with crc32c",
            )

    asyncio.run(main())
    assert servicer.counters == TcpSourceCounters(served=2)
    assert source.leases.release("req", source.secrets["req"]) is True
    assert source.freed == ["req"]
