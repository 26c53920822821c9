"""The decode worker's KV hand-offs: reserve, pull, release, admit (decode/server.py, steps 2 to 4).

Who calls it: `DecodeServicer.decode_deltas` (decode/server.py), on the asyncio thread, for a
request that came with a handle; `DecodeServicer.abort_owned` for an `Abort` call. Asyncio
thread only; the engine is reached through `worker.call` (the step loop's thread).

Lifecycle of a hand-off:
1. `check`: the handle's layout must equal ours (else FAILED_PRECONDITION naming the field;
   `KVHandle.check` is the receiver's one layout check of the transfer), before anything is
   reserved.
2. `run`: the loop thread matches the prompt against the local prefix cache and reserves
   blocks for the rest (a "kv.pull" span covers reserving and pulling); only the missing full
   blocks are pulled, each chunk verified. If the pool is too full to reserve, the prompt is
   prefilled locally.
3. On success the reservation is committed: the sequence joins the batch with its full blocks
   computed (a partial last block is recomputed with the first token). If the pull fails
   (peer gone, checksum, timeout, refused), the blocks are given back and the prompt plus first
   token are recomputed locally: same output.
4. `ReleaseKV` is sent to the source of every handle used (best effort, in the background; its
   lease also expires), unless the pull's stats say it released the lease already
   (`TransferStats.released`): a verified same-host one-copy pull does, on its own stream
   (kvtransfer/shm_pool_source.py; the worker's transport is `release_with_pull`). A failed
   pull, a recompute and a pull of no block always send it.
An `Abort` call during a hand-off (`abort`) waits until the pull has stopped writing into the
reserved blocks, then takes effect with the admission; a cancelled call whose pull is still
writing (`is_pulling`) is aborted once the pull ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from opentelemetry.trace import Span, Status, StatusCode

from tandem.common.kv_handle import KVHandle
from tandem.common.layout import LayoutMismatchError
from tandem.common.request import Request
from tandem.common.tracing import ClockAnchor, child_context, ending
from tandem.decode.stream import FirstDelta
from tandem.engine.engine import Engine
from tandem.engine.outputs import RequestOutput, Reservation
from tandem.kvtransfer.base import KVTransferError, TransferStats
from tandem.worker.worker import Worker

log = logging.getLogger(__name__)


class HandOffs:
    """The hand-offs in flight on one decode worker (module doc). One per `DecodeServicer`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.store = worker.kv_store
        self.transport = worker.transport
        # Requests whose pull is writing into reserved blocks: they are aborted only once
        # the pull has stopped, so freed blocks are never written.
        self._pulling: set[str] = set()
        # Requests in a hand-off (reserve, pull, admit) -> whether an Abort call came meanwhile;
        # that abort is applied with the admission.
        self._handing_off: dict[str, bool] = {}
        self._background: set[asyncio.Task] = set()

    def abort(self, request_id: str) -> bool:
        """True if `request_id` is in a hand-off: its abort is then applied with the admission,
        once the pull has stopped writing into its reserved blocks."""
        if request_id in self._handing_off:
            self._handing_off[request_id] = True
            return True
        return False

    def is_pulling(self, request_id: str) -> bool:
        """Whether a pull is writing into the request's reserved blocks (it aborts the request
        itself when it stops, if its call was cancelled)."""
        return request_id in self._pulling

    async def check(self, handle: KVHandle, req: Request, context: grpc.aio.ServicerContext) -> None:
        """The receiver's one layout check of a transfer, before anything is reserved."""
        try:
            handle.check(self.worker.layout, req.request_id, len(req.prompt_token_ids))
        except LayoutMismatchError as exc:
            self.worker.metrics.kv_transfer_failure("layout_mismatch")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def run(
        self,
        req: Request,
        first_token: int,
        handle: KVHandle,
        header: FirstDelta,
        deliver: Callable[[RequestOutput], None],
        context: grpc.aio.ServicerContext,
        span: Span,
        arrival: ClockAnchor,
    ) -> float:
        """Steps 2 to 4 above for one request: reserve, pull (or fall back to recompute),
        release the source, admit. Returns when (monotonic seconds) the hand-off ended; the
        "kv.pull" span and `transfer_s` cover it. An `abort` meanwhile takes effect with the
        admission."""
        worker = self.worker
        rid = req.request_id
        max_waiting = worker.config.max_waiting
        start_s = time.monotonic()
        pull_span = worker.tracing.tracer.start_span(
            "kv.pull",
            context=child_context(span),
            start_time=arrival.unix_ns_at(start_s),
            attributes={"tandem.kv.source_worker_id": handle.source_worker_id},
        )
        self._handing_off[rid] = False  # an Abort call meanwhile sets it (`abort`)
        try:
            with ending(pull_span, arrival):
                reservation = await worker.call(
                    lambda e: e.reserve(
                        rid,
                        req.original_prompt_token_ids,
                        req.sampling,
                        first_token,
                        req.cache_salt,
                        generated_token_ids=req.generated_token_ids,
                        priority=req.priority,
                        max_waiting=max_waiting,
                    ),
                    context,
                )
                stats = (
                    await self._pull(rid, handle, reservation, header, pull_span) if reservation is not None else None
                )
                pull_span.set_attributes(
                    {
                        "tandem.kv.blocks": header.num_pulled_blocks,
                        "tandem.kv.bytes": stats.bytes_moved if stats is not None else 0,
                        "tandem.kv.recomputed": stats is None,
                    }
                )
        finally:
            aborted = self._handing_off.pop(rid)
        end_s = time.monotonic()  # not before the span's end: "decode.admit" starts here
        header.transfer_s = end_s - start_s
        if stats is None or not stats.released:
            release = asyncio.get_running_loop().create_task(
                self.transport.release(handle, worker.config.kv_transfer.pull_timeout_s)
            )
            self._background.add(release)  # keep a reference until done
            release.add_done_callback(self._background.discard)
        pulled = stats is not None

        def admit(engine: Engine) -> None:
            if reservation is None:
                engine.add_request(
                    rid,
                    req.original_prompt_token_ids,
                    req.sampling,
                    req.cache_salt,
                    generated_token_ids=[*req.generated_token_ids, first_token],
                    priority=req.priority,
                    max_waiting=max_waiting,
                )
            elif pulled:
                engine.commit(rid)
            else:
                engine.unreserve(rid)
            worker.loop.subscribe(rid, deliver)
            if aborted:
                engine.abort(rid)  # the stream gets its final ABORT output after this command

        if not pulled:
            header.recomputed = True
            worker.metrics.kv_recomputes.inc()
        await worker.call(admit, context)
        return end_s

    async def _pull(
        self, rid: str, handle: KVHandle, reservation: Reservation, header: FirstDelta, pull_span: Span
    ) -> TransferStats | None:
        """Pull the blocks missing from `reservation`; the pull's stats (empty when every full
        block was cached here), or None if the pull failed (then the prompt is recomputed)."""
        worker = self.worker
        header.num_cached_tokens = reservation.num_cached_blocks * worker.layout.block_size
        worker.metrics.kv_local_hit_blocks.inc(reservation.num_cached_blocks)
        src = handle.block_ids[reservation.num_cached_blocks : reservation.num_full_blocks]
        if not src:
            return TransferStats(0, 0.0, 0, 0)
        try:
            pull = asyncio.ensure_future(
                self.transport.pull(
                    handle, src, reservation.missing_block_ids, self.store, worker.config.kv_transfer.pull_timeout_s
                )
            )
            self._pulling.add(rid)
            try:
                stats = await asyncio.shield(pull)
            except asyncio.CancelledError:
                pull.add_done_callback(lambda _: self._abort_after_pull(rid))
                raise
            self._pulling.discard(rid)
        except Exception as exc:  # any failure of the hand-off falls back to recompute
            self._pulling.discard(rid)
            reason = exc.reason.value if isinstance(exc, KVTransferError) else "internal"
            worker.metrics.kv_transfer_failure(reason)
            pull_span.set_status(Status(StatusCode.ERROR, f"{reason}: {exc}"))
            log.warning("KV pull for %s failed (%s): recomputing locally", rid, exc)
            return None
        worker.metrics.kv_transfer_bytes.inc(stats.bytes_moved)
        worker.metrics.kv_transfer_blocks.inc(stats.num_blocks)
        worker.metrics.kv_transfer_seconds.observe(stats.seconds)
        worker.metrics.kv_pull(stats.transport or self.transport.name, stats.shm_fallback)
        header.num_pulled_blocks = stats.num_blocks
        return stats

    def _abort_after_pull(self, rid: str) -> None:
        self._pulling.discard(rid)
        self.worker.abort_soon(rid)
