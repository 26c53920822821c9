"""The decode worker: pulls a prompt's KV from a prefill worker and streams the rest.

Lifecycle of a request here (DESIGN.md section 2, steps 4 to 6):
1. `Decode(request, first_token, handle)`. Without a handle, the prompt is prefilled here.
2. With one, the handle's layout must equal ours (else FAILED_PRECONDITION naming the
   field). The loop thread matches the prompt against the local prefix cache and reserves
   blocks for the rest; only those blocks are pulled, each chunk verified.
3. On success the reservation is committed: the sequence joins the batch with its whole
   prompt computed. If the pull fails (peer gone, checksum, timeout, refused), the blocks are
   given back and the prompt plus first token are recomputed locally: same output. If the
   pool is too full to reserve, the request is prefilled locally too.
4. `ReleaseKV` is sent to the source in every case (best effort; its lease also expires).
5. Tokens stream back as `DecodeDelta`s; several tokens per message when the client is
   slower than the step loop. A cancelled stream aborts the sequence within one step.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from services.common import codec
from services.common.layout import KVLayout
from services.common.pb import tandem_pb2 as pb
from services.common.pb import tandem_pb2_grpc as pb_grpc
from services.common.worker import Worker
from services.engine.engine import Engine
from services.kvtransfer.base import KVHandleInfo, KVTransferError, handle_from_proto

log = logging.getLogger(__name__)


class DecodeServicer(pb_grpc.WorkerServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.store = worker.kv_store
        self.transport = worker.transport
        # Requests whose pull is writing into reserved blocks: they are aborted only once
        # the pull has stopped, so freed blocks are never written.
        self._pulling: set[str] = set()
        self._background: set[asyncio.Task] = set()

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):
        worker = self.worker
        await worker.refuse_if_draining(context)
        try:
            req = codec.request_from_proto(request.request)
            handle = handle_from_proto(request.handle) if request.HasField("handle") else None
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        has_first = request.HasField("first_token")
        if handle is not None and not has_first:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a KV handle needs first_token")
        if handle is not None:
            await self._check_handle(handle, req, context)
        q, deliver = worker.output_queue()
        first = [request.first_token] if has_first else []
        rid = req.request_id
        header = pb.DecodeDelta()

        def admit_local(engine: Engine) -> None:
            engine.add_request(rid, req.prompt_token_ids, req.sampling, req.cache_salt, generated_token_ids=first)
            worker.loop.subscribe(rid, deliver)

        try:
            if handle is None:
                await worker.call(admit_local, context)
            else:
                await self._hand_off(req, request.first_token, handle, header, deliver, context)
            async for delta in self._stream(q, header):
                yield delta
        except asyncio.CancelledError:
            if rid not in self._pulling:
                worker.abort_soon(rid)
            raise

    async def _check_handle(self, handle: KVHandleInfo, req: codec.WorkerRequest, context) -> None:
        try:
            theirs = KVLayout.parse(handle.layout)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"handle.layout: {exc}")
        mismatch = self.worker.layout.mismatch(theirs)
        if mismatch:
            self.worker.metrics.kv_transfer_failure("layout_mismatch")
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
        bs = self.worker.layout.block_size
        if handle.request_id != req.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "handle.request_id differs from request.request_id")
        if handle.num_tokens != len(req.prompt_token_ids) or len(handle.block_ids) != -(-handle.num_tokens // bs):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"handle covers {handle.num_tokens} tokens in {len(handle.block_ids)} blocks; "
                f"the prompt has {len(req.prompt_token_ids)} tokens",
            )

    async def _hand_off(self, req, first_token: int, handle: KVHandleInfo, header: pb.DecodeDelta, deliver, context) -> None:
        worker = self.worker
        rid = req.request_id
        reservation = await worker.call(
            lambda e: e.reserve(rid, req.prompt_token_ids, req.sampling, first_token, req.cache_salt), context
        )
        pulled = False
        if reservation is not None:
            header.num_cached_tokens = reservation.num_cached_blocks * worker.layout.block_size
            worker.metrics.kv_local_hit_blocks.inc(reservation.num_cached_blocks)
            src = handle.block_ids[reservation.num_cached_blocks :]
            try:
                if src:
                    pull = asyncio.ensure_future(
                        self.transport.pull(
                            handle, src, reservation.missing_block_ids, self.store, worker.config.transfer_timeout_s
                        )
                    )
                    self._pulling.add(rid)
                    try:
                        stats = await asyncio.shield(pull)
                    except asyncio.CancelledError:
                        pull.add_done_callback(lambda _: self._abort_after_pull(rid))
                        raise
                    self._pulling.discard(rid)
                    worker.metrics.kv_transfer_bytes.inc(stats.bytes_moved)
                    worker.metrics.kv_transfer_blocks.inc(stats.num_blocks)
                    worker.metrics.kv_transfer_seconds.observe(stats.seconds)
                    header.num_pulled_blocks = stats.num_blocks
                pulled = True
            except Exception as exc:  # any failure of the hand-off falls back to recompute
                self._pulling.discard(rid)
                worker.metrics.kv_transfer_failure(exc.reason.value if isinstance(exc, KVTransferError) else "internal")
                log.warning("KV pull for %s failed (%s): recomputing locally", rid, exc)
        release = asyncio.get_running_loop().create_task(self.transport.release(handle, worker.config.transfer_timeout_s))
        self._background.add(release)  # keep a reference until done
        release.add_done_callback(self._background.discard)

        def admit(engine: Engine) -> None:
            if reservation is None:
                engine.add_request(rid, req.prompt_token_ids, req.sampling, req.cache_salt, generated_token_ids=[first_token])
            elif pulled:
                engine.commit(rid)
            else:
                engine.unreserve(rid)
            worker.loop.subscribe(rid, deliver)

        if not pulled:
            header.recomputed = True
            worker.metrics.kv_recomputes.inc()
        await worker.call(admit, context)

    def _abort_after_pull(self, rid: str) -> None:
        self._pulling.discard(rid)
        self.worker.abort_soon(rid)

    async def _stream(self, q: asyncio.Queue, header: pb.DecodeDelta):
        """Yield DecodeDeltas, coalescing whatever outputs are ready; the first carries header."""
        timeout_s = self.worker.config.request_timeout_s
        first = True
        while True:
            outs = [await asyncio.wait_for(q.get(), timeout_s)]
            while not q.empty():
                outs.append(q.get_nowait())
            delta = pb.DecodeDelta()
            if first:
                delta.CopyFrom(header)
                first = False
            for out in outs:
                delta.token_ids.extend(out.new_token_ids)
                delta.logprobs.extend(codec.logprob_to_proto(lp) for lp in out.new_logprobs)
                if out.finished:
                    delta.finish_reason = codec.FINISH_TO_PB[out.finish_reason]
                elif not out.new_token_ids:  # the step failed and the loop aborted this request
                    delta.finish_reason = pb.FINISH_REASON_ERROR
            yield delta
            if delta.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                return

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return await self.worker.Health(request, context)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return await self.worker.Abort(request, context)


def add_servicers(worker: Worker, server: grpc.aio.Server) -> None:
    pb_grpc.add_WorkerServicer_to_server(DecodeServicer(worker), server)
