"""The torch transport's rendezvous accepts only peers that prove the cluster token (CPU gloo,
in process): a source with the token forms a pair and the bytes arrive exactly; a source
without it, or with another, or a stranger who writes into the receiver's TCPStore, gets no
pair, and the receiver's pull fails REFUSED with a clear message, its cache untouched."""

from __future__ import annotations

import asyncio
import time

import torch.distributed as dist

from tandem.common.plane_auth import ClusterToken
from tandem.kvtransfer.base import FailureReason, create_transport
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.torch_pairs import NONCE_KEY, PROOF_CONTEXT, PROOF_KEY, parse_address
from tandem.kvtransfer.torch_source import TorchKVServicer
from tests.integration.test_kvtransfer import (
    LEASED,
    TIMEOUT_S,
    assert_moved,
    assert_untouched,
    expect_failure,
    make_dest,
    make_layout,
    make_source,
    serving,
    snapshot,
)

TOKEN = ClusterToken("the-cluster-token-for-pair-tests")
OTHER = ClusterToken("another-clusters-token-000000000")
RECEIVER_CONNECT_S = 2.0  # the receiver gives up first: its own explanation is the one raised
SOURCE_CONNECT_S = 8.0


def _receiver(token: ClusterToken | None):
    return create_transport(
        "torch", KVTransferConfig(transport="torch", connect_timeout_s=RECEIVER_CONNECT_S, token=token)
    )


def _servicer(source, token: ClusterToken | None) -> TorchKVServicer:
    config = KVTransferConfig(transport="torch", connect_timeout_s=SOURCE_CONNECT_S, token=token)
    return TorchKVServicer(source.store, source.leases, config)


def test_a_source_with_the_token_forms_a_pair() -> None:
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = _receiver(TOKEN)
        async with serving(_servicer(source, TOKEN)) as address:
            await transport.pull(source.handle(address), LEASED[:6], tuple(range(6)), dest, TIMEOUT_S)
            assert len(transport._pairs) == 1
        await transport.close()

    asyncio.run(main())
    assert_moved(source.store, LEASED[:6], dest, tuple(range(6)), before)


def _refused(source_token: ClusterToken | None, *fragments: str) -> None:
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()
    before = snapshot(dest)

    async def main() -> None:
        transport = _receiver(TOKEN)
        async with serving(_servicer(source, source_token)) as address:
            started = time.monotonic()
            await expect_failure(
                transport.pull(source.handle(address), LEASED[:4], (1, 2, 3, 4), dest, TIMEOUT_S),
                FailureReason.REFUSED,
                *fragments,
            )
            assert time.monotonic() - started < TIMEOUT_S
            assert transport._pairs == {}  # no pair was kept
        await transport.close()

    asyncio.run(main())
    assert_untouched(dest, before)


def test_a_source_without_the_token_gets_no_pair() -> None:
    _refused(None, "the source did not prove the cluster token within 2.0 s")


def test_a_source_with_another_token_gets_no_pair() -> None:
    _refused(OTHER, "the source did not prove the cluster token (wrong proof)")


def test_a_stranger_on_the_store_cannot_prove_the_token() -> None:
    """A process that joins the receiver's TCPStore directly (no gRPC at all) reads the nonce
    and writes a proof made with another token: the receiver refuses the pair."""
    source, dest = make_source(make_layout()), make_dest(make_layout())
    source.grant()

    async def main() -> None:
        transport = _receiver(TOKEN)
        pair = transport._pair_for("stranger:1", dest)
        host, port = parse_address(transport._store().address)

        def stranger() -> None:
            store = dist.PrefixStore(pair.pair_id, dist.TCPStore(host, port, is_master=False, use_libuv=True))
            nonce = store.get(NONCE_KEY).decode()
            store.set(PROOF_KEY, OTHER.proof(PROOF_CONTEXT, pair.pair_id, nonce))

        forming = asyncio.ensure_future(asyncio.to_thread(pair.form, transport._store().store, 5.0, TOKEN))
        await asyncio.to_thread(stranger)
        await expect_failure(forming, FailureReason.REFUSED, "(wrong proof)")
        assert pair.broken and pair.group is None
        await transport.close()

    asyncio.run(main())
