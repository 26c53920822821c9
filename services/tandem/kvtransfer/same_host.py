"""Chooses the KV path per pull: shared memory when the source is on this host, else the
network transport, which also takes over when the same-host path fails.

The decode worker's transport is a `SameHostTransport` around its configured network
transport whenever `kv_transfer.shm` is on (`with_same_host`); on the prefill worker the same
object serves both (`add_source`). Rules of a pull:
1. The handle names the source's host id (`KVHandle.source_host_id`, set by a source that
   serves same-host pulls). Equal to ours: shared memory (shm_transport.py). Else: network.
2. A same-host failure that says the bytes or the blocks are wrong (checksum, block hashes,
   layout) is raised as it is: the prompt is recomputed, never fetched again elsewhere (fail
   closed). Any other failure (segment not reachable from here, source gone or older,
   refused, timeout) is logged and the pull goes over the network within what is left of
   its deadline; the stats then say which reason made it fall back.
3. A decode worker's transport (`release_with_pull`) releases the lease with a verified
   one-copy pull (shm_pool_source.py); the pull's stats then say `released`, and the caller
   skips `release` (decode/handoff.py). `release` itself always calls ReleaseKV.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING

from tandem.common.host_id import local_host_id
from tandem.common.kv_handle import KVHandle
from tandem.kvtransfer.base import FailureReason, KVTransferError, KVTransport, TransferStats
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.shm_source import ShmKVServicer
from tandem.kvtransfer.shm_transport import ShmTransport

if TYPE_CHECKING:
    import grpc

    from tandem.kvtransfer.block_store import KVBlockStore
    from tandem.kvtransfer.leases import LeaseTable

log = logging.getLogger(__name__)

FAIL_CLOSED = frozenset({FailureReason.CHECKSUM, FailureReason.HASH_MISMATCH, FailureReason.LAYOUT_MISMATCH})
MIN_FALLBACK_TIMEOUT_S = 1.0  # the network pull after a failed same-host one gets at least this


class SameHostTransport:
    """A `KVTransport`: shared memory for same-host sources, `network` for the rest."""

    def __init__(self, network: KVTransport, config: KVTransferConfig, release_with_pull: bool = False) -> None:
        """`release_with_pull`: each lease is pulled once (a decode worker's hand-off), so a
        verified one-copy pull may release it (ShmTransport; its stats say `released`)."""
        self.network = network
        self.name = network.name
        self.host_id = config.host_id or local_host_id(os.environ)
        self.config = dataclasses.replace(config, host_id=self.host_id)
        self.shm = ShmTransport(self.config, self.host_id, release_with_pull)
        self._servicers: list[ShmKVServicer] = []

    async def pull(
        self,
        handle: KVHandle,
        src_block_ids: tuple[int, ...],
        dst_block_ids: tuple[int, ...],
        store: KVBlockStore,
        timeout_s: float,
    ) -> TransferStats:
        if handle.source_host_id != self.host_id:
            stats = await self.network.pull(handle, src_block_ids, dst_block_ids, store, timeout_s)
            return dataclasses.replace(stats, transport=self.network.name)
        deadline_s = time.monotonic() + timeout_s
        try:
            return await self.shm.pull(handle, src_block_ids, dst_block_ids, store, timeout_s)
        except KVTransferError as exc:
            if exc.reason in FAIL_CLOSED:
                raise
            reason, error = exc.reason.value, str(exc)
        except (asyncio.CancelledError, ValueError):
            raise
        except Exception as exc:  # never a failed pull because shared memory failed
            reason, error = "internal", repr(exc)
        log.warning("same-host KV pull of %s failed (%s): pulling over %s", handle.request_id, error, self.name)
        remaining_s = max(deadline_s - time.monotonic(), MIN_FALLBACK_TIMEOUT_S)
        stats = await self.network.pull(handle, src_block_ids, dst_block_ids, store, remaining_s)
        return dataclasses.replace(stats, transport=self.network.name, shm_fallback=reason)

    async def release(self, handle: KVHandle, timeout_s: float) -> bool:
        return await self.network.release(handle, timeout_s)

    def add_source(self, server: grpc.aio.Server, store: KVBlockStore, leases: LeaseTable) -> None:
        self.network.add_source(server, store, leases)
        servicer = ShmKVServicer(store, leases, self.config, self.host_id)
        servicer.register(server)
        self._servicers.append(servicer)

    async def close(self) -> None:
        for servicer in self._servicers:
            servicer.close()
        await self.shm.close()
        await self.network.close()


def with_same_host(network: KVTransport, config: KVTransferConfig, release_with_pull: bool = False) -> KVTransport:
    """The worker's transport: `network`, wrapped for same-host pulls when `config.shm` is on.
    `release_with_pull`: see SameHostTransport (a decode worker's)."""
    return SameHostTransport(network, config, release_with_pull) if config.shm else network
