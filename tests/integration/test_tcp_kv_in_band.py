"""The tcp transport's in-band pull requests (kvtransfer/tcp_request.py) over real sockets.

A kept data connection carries each later pull's request itself: the source checks it as
PullKVTcp checks its own (the same codes and messages, in the header) and closes the
connection on a refusal; a frame that is not a request (wrong magic, no time, over the size
cap, not a PullKVRequest, a token) closes the connection unanswered and counts as refused;
the request's deadline bounds the source's send; a stalled source is a bounded timeout; a
source killed mid-pull is a prompt PEER_UNAVAILABLE with nothing written after the pull.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import time

from tandem.common import kv_codec
from tandem.kvtransfer import tcp_listener, tcp_request, tcp_wire
from tandem.kvtransfer.base import FailureReason
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.tcp_source import TcpKVServicer, TcpSourceCounters
from tandem.loadtest.bench.kv_source import synthetic_block_hashes
from tests.integration.test_kvtransfer import (
    TIMEOUT_S,
    Source,
    assert_moved,
    assert_untouched,
    expect_failure,
    make_dest,
    make_source,
    serving,
    snapshot,
)
from tests.integration.test_tcp_kv import (
    BIG,
    HELD,
    StallingServicer,
    connect,
    read_exactly,
    receiver,
    remote_handle,
    source_process,
    tcp_pair,
    ticket_for,
    until_closed,
    wait_for,
)


async def kept_connection(source: Source, address: str) -> socket.socket:
    """A hand-made data connection that carried a pull of block 3 (so the source now reads
    requests on it)."""
    async with receiver() as transport:
        ticket = await ticket_for(transport, source.handle(address, blocks=HELD), (3,))
    sock = connect(ticket, ticket.token)
    size = tcp_wire.HEADER.size + ticket.size_bytes + tcp_wire.TRAILER.size
    assert len(await asyncio.to_thread(read_exactly, sock, size)) == size
    return sock


def frame(body: bytes, timeout_ms: int = 5000, size: int | None = None, magic: bytes = b"TKR1") -> bytes:
    return tcp_request.REQUEST.pack(magic, timeout_ms, len(body) if size is None else size) + body


def body(source: Source, block_ids: tuple[int, ...], **changes: object) -> bytes:
    request = kv_codec.PullKVRequest(
        "req", block_ids, source.store.layout.describe(), 0, source.secrets["req"], synthetic_block_hashes(block_ids)
    )
    return kv_codec.pull_kv_request_to_bytes(dataclasses.replace(request, **changes))  # type: ignore[arg-type]


def test_a_frame_that_is_not_a_request_closes_the_kept_connection_unanswered(monkeypatch) -> None:
    monkeypatch.setattr(tcp_listener, "TOKEN_TIMEOUT_S", 1.0)
    source, servicer = tcp_pair()
    cap = tcp_request.request_cap(servicer.config.max_blocks_per_pull)
    assert cap == 4096 + 16 * 65536
    good = body(source, (5,))
    two_ids_one_hash = kv_codec.pull_kv_request_to_bytes(
        kv_codec.PullKVRequest("req", (5, 6), BIG.describe(), 0, source.secrets["req"], (1,))
    )
    frames = {
        "another magic": frame(good, magic=b"TKV1"),
        "no time": frame(good, timeout_ms=0),
        "over the cap": frame(b"", size=cap + 1),  # its body is never read: closed at once
        "not a PullKVRequest": frame(b"\xff\xff\xff"),
        "a hash short": frame(two_ids_one_hash),
        "a token inside": frame(body(source, (5,), tcp_token=os.urandom(kv_codec.TCP_TOKEN_BYTES))),
        "a token": os.urandom(kv_codec.TCP_TOKEN_BYTES),
        "shorter than it says": frame(good, size=len(good) + 10),  # closed after TOKEN_TIMEOUT_S
    }
    dest = make_dest(BIG)

    async def main() -> None:
        async with serving(servicer) as address:
            for i, (case, raw) in enumerate(frames.items(), start=1):
                with await kept_connection(source, address) as sock:
                    started = time.monotonic()
                    sock.sendall(raw)
                    assert await asyncio.to_thread(until_closed, sock) == b"", case
                    elapsed = time.monotonic() - started
                assert elapsed >= 0.9 if case == "shorter than it says" else elapsed < 0.8, (case, elapsed)
                expected = TcpSourceCounters(served=i, refused_connections=i)
                assert await wait_for(lambda e=expected: servicer.counters == e), (case, servicer.counters)
            async with receiver() as transport:  # the source still serves, the lease is intact
                before = snapshot(dest)
                await transport.pull(source.handle(address, blocks=HELD), (5, 6), (7, 8), dest, TIMEOUT_S)
                assert_moved(source.store, (5, 6), dest, (7, 8), before)

    asyncio.run(main())
    assert len(source.leases) == 1 and source.freed == []


def test_an_in_band_request_is_checked_as_pull_kv_tcp_checks_its_own() -> None:
    source = make_source(BIG)
    source.grant("req", blocks=HELD[:48])
    source.grant("other", blocks=HELD[48:])
    servicer = TcpKVServicer(source.store, source.leases, KVTransferConfig(transport="tcp", max_blocks_per_pull=4))
    dest = make_dest(BIG)
    other_layout = make_dest(dataclasses.replace(BIG, block_size=32))
    before = snapshot(dest)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            genuine = source.handle(address, blocks=HELD[:48])
            cases = [
                (  # another lease's blocks, under this lease's id and secret
                    source.handle(address, blocks=HELD),
                    (50,),
                    dest,
                    FailureReason.REFUSED,
                    "NOT_FOUND: block id 50 is not in the lease for request 'req'",
                ),
                (  # another lease's id, with this lease's secret
                    source.handle(address, "other", blocks=HELD[48:], secret=source.secrets["req"]),
                    (50,),
                    dest,
                    FailureReason.REFUSED,
                    "NOT_FOUND: no lease for request 'other' (unknown request id, or not its secret)",
                ),
                (
                    dataclasses.replace(genuine, block_hashes=tuple(h ^ 1 for h in genuine.block_hashes)),
                    (1, 2),
                    dest,
                    FailureReason.HASH_MISMATCH,
                    "FAILED_PRECONDITION: block hashes differ from the lease's for request 'req': "
                    "block 1 has hash 0x0000b10c00000001, the receiver expects 0x0000b10c00000000",
                ),
                (
                    genuine,
                    (1,),
                    other_layout,
                    FailureReason.LAYOUT_MISMATCH,
                    "FAILED_PRECONDITION: KV layout mismatch: block_size (ours 16, theirs 32)",
                ),
                (
                    genuine,
                    (1, 2, 3, 4, 5),
                    dest,
                    FailureReason.PROTOCOL,
                    "INVALID_ARGUMENT: 5 block ids requested; a pull moves 1..4",
                ),
            ]
            for i, (handle, ids, store, reason, message) in enumerate(cases, start=1):
                await transport.pull(genuine, (0,), (0,), dest, TIMEOUT_S)  # a kept connection again
                assert len(transport.kept) == 1
                await expect_failure(
                    transport.pull(handle, ids, ids, store, TIMEOUT_S), reason, f"{servicer.address}: {message}"
                )
                assert len(transport.kept) == 0  # the refused request's connection was closed
                assert await wait_for(lambda n=i: servicer.counters == TcpSourceCounters(served=n))
            assert servicer._tickets == {}

    asyncio.run(main())
    assert_moved(source.store, (0,), dest, (0,), before)  # nothing else was written
    assert source.freed == [] and len(source.leases) == 2


def test_the_deadline_of_an_in_band_request_bounds_the_send_and_the_receive() -> None:
    # 96 blocks of 16 KiB per plane (24 MiB): far more than an unread connection buffers
    layout = dataclasses.replace(BIG, head_dim=128, num_layers=8)
    source, servicer = tcp_pair(layout)

    async def main() -> None:
        async with serving(servicer) as address:
            with await kept_connection(source, address) as sock:
                started = time.monotonic()
                sock.sendall(frame(body(source, HELD), timeout_ms=500))  # and read nothing
                await asyncio.sleep(0.25)
                assert servicer.counters == TcpSourceCounters(served=1)  # still waiting for the receiver
                assert await wait_for(lambda: servicer.counters == TcpSourceCounters(served=1, failed_sends=1))
                assert time.monotonic() - started < 3.0
            assert source.leases.release("req", source.secrets["req"]) is True

    asyncio.run(main())
    assert source.freed == ["req"]  # freed at once: the timed-out send unpinned it


def test_a_stalled_source_on_a_kept_connection_is_a_bounded_timeout() -> None:
    source, servicer = tcp_pair(servicer_cls=StallingServicer)
    assert isinstance(servicer, StallingServicer)
    dest = make_dest(BIG)

    async def main() -> None:
        async with serving(servicer) as address, receiver() as transport:
            handle = source.handle(address, blocks=HELD)
            servicer.go.set()
            await transport.pull(handle, (1,), (1,), dest, TIMEOUT_S)
            assert len(transport.kept) == 1
            servicer.go.clear()
            started = time.monotonic()
            await expect_failure(
                transport.pull(handle, HELD, HELD, dest, 1.0), FailureReason.TIMEOUT, "did not arrive in time"
            )
            assert time.monotonic() - started < 3.0 and len(transport.kept) == 0
            after = snapshot(dest)
            servicer.go.set()  # the rest finds the receiver gone
            assert await wait_for(lambda: servicer.counters == TcpSourceCounters(served=1, failed_sends=1))
            assert_untouched(dest, after)

    asyncio.run(main())
    assert source.leases.release("req", source.secrets["req"]) is True and source.freed == ["req"]


def test_a_source_killed_mid_pull_on_a_kept_connection_is_a_prompt_clear_failure() -> None:
    dest = make_dest(BIG)

    async def main(ready: dict) -> None:
        async with receiver() as transport:
            await transport.pull(remote_handle(ready), (1,), (1,), dest, 30.0)  # leaves a kept connection
            assert len(transport.kept) == 1
            pull = asyncio.ensure_future(transport.pull(remote_handle(ready), HELD, HELD, dest, 30.0))
            proc = ready["proc"]
            assert await asyncio.to_thread(lambda: json.loads(proc.stdout.readline())) == {"event": "sending"}
            started = time.monotonic()
            os.kill(ready["pid"], signal.SIGKILL)
            half = len(HELD) * dest.bytes_per_block // 2
            await expect_failure(
                pull, FailureReason.PEER_UNAVAILABLE, f"the source closed the KV connection after {half} bytes"
            )
            assert time.monotonic() - started < 5.0 and len(transport.kept) == 0
            after = snapshot(dest)
            await asyncio.sleep(0.2)
            assert_untouched(dest, after)  # nothing written once the pull ended
            await expect_failure(  # the next pull from the dead source fails at once too
                transport.pull(remote_handle(ready), (1,), (1,), dest, 5.0), FailureReason.PEER_UNAVAILABLE
            )

    with source_process("hang-second") as ready:
        asyncio.run(main(ready))
