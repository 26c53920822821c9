"""The torch transport's direct path (torch_plan.py): planes of at least 1 MiB, ids in runs.

The source sends from its cache and the receiver receives into its destination blocks for
every segment whose ids are one run on that side; merged short runs are staged. Exact bytes
land for non-contiguous ids, a corrupted message is still a checksum error, and nothing
outside the destination blocks is ever written. CPU gloo, in process.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tandem.common import kv_codec
from tandem.common.layout import KVLayout
from tandem.common.pb import tandem_pb2 as pb
from tandem.kvtransfer.base import FailureReason, create_transport
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.torch_plan import Message, plan_messages, plan_segments
from tandem.kvtransfer.torch_source import TorchKVServicer
from tandem.loadtest.bench.kv_source import random_kv_caches
from tests.integration.test_kvtransfer import (
    TIMEOUT_S,
    CorruptingTorchServicer,
    FakeClock,
    Source,
    assert_moved,
    expect_failure,
    serving,
    snapshot,
)

# 32 KiB per block and plane: 32 blocks make a 1 MiB plane, 8 blocks a 256 KiB segment
LAYOUT = KVLayout("llama", num_layers=2, num_kv_heads=4, head_dim=128, dtype="float32", block_size=16)
NUM_BLOCKS = 160
HELD = tuple(range(100, 160))  # the source's prompt: one run of 60 blocks
MIN_RUN = KVTransferConfig().direct_min_run_bytes  # 256 KiB: 8 blocks


def store(seed: int) -> KVBlockStore:
    return KVBlockStore(random_kv_caches(LAYOUT, NUM_BLOCKS, seed), LAYOUT)


def source() -> Source:
    clock, freed = FakeClock(), list[str]()
    src = Source(store(1), LeaseTable(freed.append, clock), clock, freed)
    src.grant(blocks=HELD)
    return src


def outside(dst: KVBlockStore, dst_ids: tuple[int, ...], before: list[torch.Tensor]) -> bool:
    """Whether every block outside `dst_ids` still holds its bytes from `before`."""
    others = [b for b in range(dst.num_blocks) if b not in set(dst_ids)]
    return all(torch.equal(d[:, others], old[:, others]) for d, old in zip(dst.kv_caches, before))


def test_segments_are_joint_runs_and_merged_short_runs() -> None:
    s = store(0)
    # one run on both sides: one segment
    assert plan_segments(tuple(range(40)), tuple(range(50, 90)), s, MIN_RUN) == ()
    # planes under 1 MiB (31 blocks): one segment whatever the ids
    assert plan_segments(tuple(range(31)), tuple(range(31, 0, -1)), s, MIN_RUN) == ()
    # destination runs of 10 and 20 blocks, then 5 single blocks, then a run of 8
    dst = (*range(60, 70), *range(0, 20), 30, 32, 34, 36, 38, *range(40, 48))
    assert plan_segments(tuple(range(43)), dst, s, MIN_RUN) == (10, 30, 35, 43)
    assert plan_segments(tuple(range(43)), dst, s, 1 << 40) == ()  # no run that long: one staged segment
    # a source break splits a destination run
    src = (*range(0, 16), *range(20, 36))
    assert plan_segments(src, tuple(range(32)), s, MIN_RUN) == (16, 32)
    messages = plan_messages(32, s, (16, 32))
    assert len(messages) == 2 * s.num_planes
    assert messages[:3] == [
        Message(0, 1, 0, 16, 0, 16 * 32768),
        Message(0, 1, 16, 32, 16 * 32768, 16 * 32768),
        Message(1, 2, 0, 16, 32 * 32768, 16 * 32768),
    ]
    assert messages[-1].offset_bytes + messages[-1].size_bytes == 32 * s.bytes_per_block


def test_segment_ends_cross_the_wire_checked() -> None:
    request = kv_codec.SendKVRequest("r", (5, 6, 7, 9), "layout", "127.0.0.1:1", "p", 0, b"s", (1, 2, 3, 4), (3, 4))
    assert kv_codec.send_kv_request_from_bytes(kv_codec.send_kv_request_to_bytes(request)) == request
    for bad in ((3,), (2, 2, 4), (0, 4), (3, 5)):
        raw = pb.SendKVRequest(block_ids=(5, 6, 7, 9), block_hashes=(1, 2, 3, 4), segment_ends=bad).SerializeToString()
        with pytest.raises(ValueError) as info:
            kv_codec.send_kv_request_from_bytes(raw)
        assert str(info.value) == (f"segment_ends {list(bad)} must increase strictly from above 0 to 4 block ids")


@pytest.mark.parametrize(
    "src_ids, dst_ids, staged",
    [
        # runs of 12, 20 and 16 blocks in shuffled order, plus 4 scattered ids (merged, staged)
        (HELD[:52], (*range(40, 52), *range(0, 20), *range(80, 96), 99, 101, 120, 140), (0, 1)),
        # the source's ids broken in two, the destination one run: nothing staged
        ((*HELD[:20], *HELD[30:50]), tuple(range(10, 50)), (0, 0)),
        # 3 scattered source ids between two runs: the source stages them, the receiver does not
        ((*range(100, 120), 125, 127, 129, *range(140, 156)), tuple(range(0, 39)), (1, 0)),
    ],
)
def test_direct_pull_of_non_contiguous_ids_is_exact(
    src_ids: tuple[int, ...], dst_ids: tuple[int, ...], staged: tuple[int, int]
) -> None:
    src, dest = source(), store(99)
    segments = plan_segments(src_ids, dst_ids, dest, MIN_RUN)
    assert len(segments) > 1  # the direct path, not one staged segment
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("torch")
        servicer = TorchKVServicer(src.store, src.leases, KVTransferConfig())
        async with serving(servicer) as address:
            handle = src.handle(address, blocks=HELD)
            stats = await transport.pull(handle, src_ids, dst_ids, dest, TIMEOUT_S)
            assert stats.bytes_moved == len(src_ids) * dest.bytes_per_block
            assert stats.num_chunks == dest.num_planes * len(segments)
        # (source, receiver) staging buffers: only where a side's ids in a segment are no run
        assert (servicer.staging.num_allocations, transport.staging.num_allocations) == staged
        await transport.close()

    asyncio.run(main())
    assert_moved(src.store, src_ids, dest, dst_ids, before)


def test_direct_pull_with_a_corrupted_message_is_refused_and_writes_only_its_blocks() -> None:
    src, dest = source(), store(99)
    src_ids, dst_ids = HELD[:40], (*range(0, 20), *range(60, 80))
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("torch")
        async with serving(CorruptingTorchServicer(src.store, src.leases, KVTransferConfig())) as address:
            await expect_failure(
                transport.pull(src.handle(address, blocks=HELD), src_ids, dst_ids, dest, TIMEOUT_S),
                FailureReason.CHECKSUM,
                f"received {40 * dest.bytes_per_block} bytes with xxh64",
            )
        assert len(transport._pairs) == 1  # every message completed before the compare: the pair stays
        await transport.close()

    asyncio.run(main())
    assert outside(dest, dst_ids, before)
    # the corrupted byte (byte 7 of the first message: layer 0, K, destination block 0) landed
    # as sent: the direct path received it in place and the checksum refused the pull
    got, want = dest.kv_caches[0][0, 0].reshape(-1).view(torch.uint8), src.store.kv_caches[0][0, 100]
    assert int(got[7]) == int(want.reshape(-1).view(torch.uint8)[7]) ^ 0x10
