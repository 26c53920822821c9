"""What a decode worker checks before it uses a KV handle (issue 16, deliverable 0).

A handle is a claim made by whoever called `Decode`: "the KV of this prompt's blocks sits in
these blocks of that worker". The decode worker files pulled blocks in its prefix cache under
the hashes of its OWN prompt, so a handle for another prompt would poison the cache: a later
request for this prompt would be served another prompt's KV. So, before anything is reserved,
pulled or dialed (`HandleVerifier.accept`, called by the decode servicer on its asyncio thread):

1. `KVHandle.check` (the layout, the request id, the token count) already passed: a
   contradiction there is the caller's bug and the call is refused (decode/server.py).
2. `check_block_hashes`: the handle's block hashes equal the hashes of the prompt's full
   blocks, computed here with the same function (`tandem.common.block_hash`) from this
   worker's model id and the request's cache salt. Only full blocks are ever pulled: a
   partial last block has no hash, so it is recomputed here (`Batcher.commit`).
3. `SourceRegistry.check` (decode/sources.py): the source is a registered, live prefill
   worker at the address the handle names, with this worker's layout fingerprint, model id
   and block-hash version. A worker without cluster state (no Redis: driven directly, as in
   tests) has no registry to ask and skips this check (logged once, at start).

A failure of 2 or 3 is a `HandleRejectedError`. The source is then never dialed (no pull, no
release: its lease expires), the rejection is counted by reason
(`tandem_kv_handle_rejections_total{reason}`) and as a recompute, it is logged, and the prompt
is prefilled locally, so the client still gets exact tokens.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.trace import Span, Status, StatusCode

from tandem.common.block_hash import BLOCK_HASH_VERSION, block_extra, hash_blocks
from tandem.common.kv_handle import KVHandle
from tandem.common.metrics import WorkerMetrics
from tandem.common.request import Request
from tandem.common.workers import WorkerInfo, WorkerRole

log = logging.getLogger(__name__)


class RejectReason(enum.Enum):
    """Why a handle was not used (the `reason` label of the rejection counter)."""

    HASH_MISMATCH = "hash_mismatch"  # the handle's block hashes are not this prompt's
    UNREGISTERED_SOURCE = "unregistered_source"  # no live registered worker with that id at that address
    INCOMPATIBLE_SOURCE = "incompatible_source"  # registered, but not a prefill worker like us
    REGISTRY_UNAVAILABLE = "registry_unavailable"  # Redis did not answer, and no recent answer is cached


class HandleRejectedError(Exception):
    """A handle that the decode worker will not use; the message names the block, worker or
    field at fault."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.args[0]}"


def check_block_hashes(handle: KVHandle, prompt_token_ids: Sequence[int], block_size: int, extra: bytes) -> None:
    """Raise HandleRejectedError(HASH_MISMATCH) unless `handle.block_hashes` are exactly the
    hashes of every full block of `prompt_token_ids` (`extra`: `block_extra(model id, cache
    salt)` of this worker and the request). Pure; the caller checked the token count."""
    ours = hash_blocks(prompt_token_ids, block_size, extra)
    theirs = handle.block_hashes
    if len(theirs) != len(ours):
        raise HandleRejectedError(
            RejectReason.HASH_MISMATCH,
            f"the handle of request {handle.request_id!r} has {len(theirs)} block hashes; "
            f"the prompt has {len(ours)} full blocks",
        )
    for index, (claimed, computed) in enumerate(zip(theirs, ours)):
        if claimed != computed:
            raise HandleRejectedError(
                RejectReason.HASH_MISMATCH,
                f"block {index} of the handle of request {handle.request_id!r} has hash {claimed:016x}; "
                f"the prompt's block {index} hashes to {computed:016x} here",
            )


@dataclass(frozen=True)
class Compatibility:
    """What a KV source must share with this worker: the layout fingerprint (the bytes), the
    model id (the weights that made them) and the block-hash version (what its hashes mean)."""

    fingerprint: str
    model_id: str
    block_hash_version: int = BLOCK_HASH_VERSION


def check_source(handle: KVHandle, info: WorkerInfo | None, expected: Compatibility) -> None:
    """Raise HandleRejectedError unless `info` (the registry's entry for the handle's source
    worker id; None if there is none) is a live prefill worker at `handle.source_address`
    whose fingerprint, model id and block-hash version are `expected`'s (this worker's)."""
    worker_id = handle.source_worker_id
    if info is None:
        raise HandleRejectedError(
            RejectReason.UNREGISTERED_SOURCE, f"worker {worker_id!r} is not a registered, live worker"
        )
    if info.address != handle.source_address:
        raise HandleRejectedError(
            RejectReason.UNREGISTERED_SOURCE,
            f"worker {worker_id!r} is registered at {info.address}, not at {handle.source_address}",
        )
    if info.role is not WorkerRole.PREFILL:
        raise HandleRejectedError(
            RejectReason.INCOMPATIBLE_SOURCE,
            f"worker {worker_id!r} is a {info.role.value} worker, not a prefill worker",
        )
    diffs = [
        f"{name} (ours {getattr(expected, name)!r}, theirs {getattr(info, name)!r})"
        for name in ("fingerprint", "model_id", "block_hash_version")
        if getattr(info, name) != getattr(expected, name)
    ]
    if diffs:
        raise HandleRejectedError(
            RejectReason.INCOMPATIBLE_SOURCE, f"worker {worker_id!r} is incompatible: {', '.join(diffs)}"
        )


class SourceCheck(Protocol):
    """What `HandleVerifier` needs of the registry view (decode/sources.py's SourceRegistry)."""

    async def check(self, handle: KVHandle) -> None:
        """Raise HandleRejectedError unless the handle's source may be dialed."""
        ...


class HandleVerifier:
    """Runs checks 2 and 3 of the module doc for the decode servicer, and records a rejection.

    `block_size` and `model_id` are this worker's; `sources` is None for a worker without
    cluster state. Asyncio thread only.
    """

    def __init__(
        self, block_size: int, model_id: str, sources: SourceCheck | None, metrics: WorkerMetrics, worker_id: str
    ) -> None:
        self._block_size, self._model_id = block_size, model_id
        self._sources, self._metrics = sources, metrics
        if sources is None:
            log.warning(
                "worker %s has no cluster state: KV handles are checked against the prompt's block hashes, "
                "but their source is not checked against a registry",
                worker_id,
            )

    async def accept(self, handle: KVHandle, request: Request, span: Span) -> bool:
        """True if the handle may be used. False if it was rejected: then it is counted (by
        reason, and as a recompute), logged, and recorded on `span`; the caller prefills the
        prompt locally and never dials the source."""
        try:
            extra = block_extra(self._model_id, request.cache_salt)
            check_block_hashes(handle, request.prompt_token_ids, self._block_size, extra)
            if self._sources is not None:
                await self._sources.check(handle)
        except HandleRejectedError as exc:
            self._metrics.kv_handle_rejected(exc.reason.value)
            self._metrics.kv_recomputes.inc()
            span.set_status(Status(StatusCode.ERROR, f"KV handle rejected: {exc}"))
            span.set_attribute("tandem.kv.handle_rejected", exc.reason.value)
            log.warning("KV handle of request %s rejected (%s): recomputing locally", request.request_id, exc)
            return False
        return True
