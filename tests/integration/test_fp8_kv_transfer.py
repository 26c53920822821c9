"""The KV hand-off with an FP8 cache: FP8 bytes move exactly, and an FP8 worker and a bfloat16
worker never exchange KV (the layout names both dtypes when it refuses).

The scales do not travel: equal layouts (fingerprints) prove equal scales (tandem.common.layout),
so a layout whose scale digest differs is refused like a dtype mismatch.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from tandem.common.layout import KVLayout, LayoutMismatchError
from tandem.kernels.reference import ref_pack_blocks
from tandem.kvtransfer.base import FailureReason, create_transport
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.grpc_transport import KVTransferServicer
from tests.integration.test_kvtransfer import (
    LEASED,
    TIMEOUT_S,
    assert_moved,
    assert_untouched,
    expect_failure,
    make_dest,
    make_source,
    serving,
    snapshot,
)

FP8_LAYOUT = KVLayout(
    "llama", 2, 2, 32, "bfloat16", 16, kv_dtype="float8_e4m3fn", kv_scales="0123456789abcdef"
)  # fmt: skip
BF16_LAYOUT = KVLayout("llama", 2, 2, 32, "bfloat16", 16)


def test_fp8_layout_describes_dtype_and_scales() -> None:
    assert BF16_LAYOUT.kv_dtype == "bfloat16" and BF16_LAYOUT.kv_scales == "none"
    assert FP8_LAYOUT.describe() == (
        "architecture=llama;num_layers=2;num_kv_heads=2;head_dim=32;dtype=bfloat16;block_size=16;"
        "tensor_parallel_size=1;layout_version=2;kv_dtype=float8_e4m3fn;kv_scales=0123456789abcdef"
    )
    assert KVLayout.parse(FP8_LAYOUT.describe()) == FP8_LAYOUT
    assert FP8_LAYOUT.fingerprint != BF16_LAYOUT.fingerprint
    other_scales = dataclasses.replace(FP8_LAYOUT, kv_scales="fedcba9876543210")
    assert other_scales.fingerprint != FP8_LAYOUT.fingerprint
    assert FP8_LAYOUT.mismatch(other_scales) == (
        "KV layout mismatch: kv_scales (ours 0123456789abcdef, theirs fedcba9876543210)"
    )


def test_fp8_block_store_packs_the_fp8_bytes() -> None:
    store = make_source(FP8_LAYOUT).store
    assert store.dtype == torch.float8_e4m3fn and store.bytes_per_block == 2 * 2 * 16 * 2 * 32
    ids = (7, 3, 4, 5, 40)
    packed = store.pack(ids)
    expected = ref_pack_blocks([c[0] for c in store.kv_caches], [c[1] for c in store.kv_caches], ids)
    assert packed.dtype == torch.float8_e4m3fn
    assert torch.equal(packed.view(torch.uint8), expected.view(torch.uint8))


def test_fp8_blocks_scatter_into_a_fragmented_pool_exactly() -> None:
    """Ids in many short runs take the index path (index_select / index_copy_), whose CPU
    index_copy_ has no float8 kernel: the store copies the bytes as words instead."""
    source, dest = make_source(FP8_LAYOUT).store, make_dest(FP8_LAYOUT)
    src_ids, dst_ids = (7, 3, 40, 5, 90, 11, 2, 60), (9, 1, 33, 4, 80, 21, 6, 70)
    before = snapshot(dest)
    dest.unpack(source.pack(src_ids), dst_ids)
    assert_moved(source, src_ids, dest, dst_ids, before)
    planes = torch.empty(2 * source.plane_bytes(len(src_ids)), dtype=torch.uint8)
    source.pack_planes(src_ids, 1, 3, planes)  # layer 0's V and layer 1's K
    again = make_dest(FP8_LAYOUT)
    again.unpack_planes(planes, dst_ids, 1, 3)
    index = list(dst_ids)
    assert torch.equal(again.kv_caches[0][1][index], source.kv_caches[0][1][list(src_ids)])
    assert torch.equal(again.kv_caches[1][0][index], source.kv_caches[1][0][list(src_ids)])
    assert torch.equal(again.kv_caches[0][0], make_dest(FP8_LAYOUT).kv_caches[0][0])  # plane 0 not written


def test_grpc_pull_moves_fp8_blocks_exactly() -> None:
    source, dest = make_source(FP8_LAYOUT), make_dest(FP8_LAYOUT)
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = create_transport("grpc")
        async with serving(KVTransferServicer(source.store, source.leases, KVTransferConfig())) as address:
            handle = source.handle(address)
            src_ids, dst_ids = LEASED, tuple(range(50, 50 + len(LEASED)))
            stats = await transport.pull(handle, src_ids, dst_ids, dest, TIMEOUT_S)
            assert (stats.bytes_moved, stats.num_blocks) == (30 * 4096, 30)  # half of bfloat16's 8192 per block
            assert_moved(source.store, src_ids, dest, dst_ids, before)
            assert await transport.release(handle, TIMEOUT_S) is True
        await transport.close()

    asyncio.run(main())


def test_fp8_and_bf16_workers_refuse_each_others_kv() -> None:
    """Both checks name both dtypes: the receiver's handle check and the source's check."""
    source, dest = make_source(FP8_LAYOUT), make_dest(BF16_LAYOUT)
    source.grant()
    before = snapshot(dest)
    message = "kv_dtype (ours bfloat16, theirs float8_e4m3fn), kv_scales (ours none, theirs 0123456789abcdef)"

    async def main() -> None:
        transport = create_transport("grpc")
        async with serving(KVTransferServicer(source.store, source.leases, KVTransferConfig())) as address:
            with pytest.raises(LayoutMismatchError) as info:
                source.handle(address).check(dest.layout, "req", len(LEASED) * 16)
            assert str(info.value) == f"KV layout mismatch: {message}"
            await expect_failure(
                transport.pull(source.handle(address, layout=dest.layout), (10,), (1,), dest, TIMEOUT_S),
                FailureReason.LAYOUT_MISMATCH,
                "kv_dtype (ours float8_e4m3fn, theirs bfloat16)",
                "FAILED_PRECONDITION",
            )
        await transport.close()

    asyncio.run(main())
    assert_untouched(dest, before)
