"""The prefill worker: runs prompts, samples the first token, and lends the KV to a decoder.

Lifecycle of a request here (DESIGN.md section 2, step 3):
1. `Prefill(request)` validates it and queues it in the engine with `hand_off=True`; the
   batcher runs it with other prompts (chunked prefill, prefix-cache reuse). A request with
   `structured_output` first waits, on the asyncio thread, for its grammar to compile (a bad
   one is INVALID_ARGUMENT naming the problem); its first token is sampled under the grammar.
   A migration's replay (`Request.num_generated`) queues its trailing tokens as generated
   output (the grammar, penalties and bad words count them); the KV handle covers them too.
2. After the step that samples its first token, the loop thread grants a lease on the
   prompt's blocks (`lease_ttl_s`, default 30 s) and the handler returns the first token and
   a KV handle (source address, block ids, valid tokens, layout, block hashes, deadline, and
   the lease's secret, which every pull and release of the lease must present).
   If the first token already ends the request (EOS, stop token, max_tokens=1), the blocks
   are freed and no handle is returned; a prompt-only request (max_tokens=0, echo) returns
   no token at all. Prompt logprobs, when asked for, come with the answer.
3. A decode worker pulls blocks through the KV transport, which checks every request
   against the lease, then calls `ReleaseKV`. Lease expiry frees unpulled blocks.
4. A cancelled `Prefill` aborts the sequence (and any lease): nothing leaks.
5. Busy and ends without a first token: a full waiting queue (`max_waiting`) refuses the call
   (RESOURCE_EXHAUSTED), unless the request sheds a less important queued one; a shed request's
   call ends at once with RESOURCE_EXHAUSTED "shed: ...", and one ended by an `Abort` call with
   CANCELLED "request ID was aborted".

Tracing: a SERVER span "prefill" under the caller's trace context, with children
"prefill.queue" (arrival until the batcher first schedules the prompt) and "prefill.compute"
(from there until the first token is sampled); the response carries both durations.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from opentelemetry.trace import Span

from tandem.common import codec
from tandem.common.kv_handle import KVHandle
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.request import FinishReason, Request
from tandem.common.tracing import ClockAnchor, child_context, ending, request_attributes
from tandem.engine.engine import Engine
from tandem.engine.outputs import HeldKV, RequestOutput
from tandem.kvtransfer.leases import LeaseGrant
from tandem.worker.servicer import WorkerServicerBase
from tandem.worker.streams import DrainDeadline
from tandem.worker.worker import Worker


class PrefillServicer(WorkerServicerBase):
    async def Prefill(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """`request` and the answer are protobuf messages, straight from and to the codec."""
        arrival = ClockAnchor.now()
        with ending(self.worker.server_span("prefill", context, arrival), arrival) as span:
            await self.worker.refuse_if_draining(context)
            try:
                req = codec.prefill_request_from_proto(request)
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            await self.owners.claim(req.request_id, context)
            await self.worker.compile_grammar(req.sampling, context)
            return codec.prefill_result_to_proto(await self._prefill(req, context, span, arrival))

    async def _prefill(
        self, req: Request, context: grpc.aio.ServicerContext, span: Span, arrival: ClockAnchor
    ) -> codec.PrefillResult:
        worker = self.worker
        span.set_attributes(request_attributes(req.request_id, len(req.prompt_token_ids), req.sampling))
        q, deliver = worker.output_queue()
        recorder = worker.request_recorder(req, arrival, prefilled_elsewhere=False)
        lease_ttl_s = worker.config.lease_ttl_s
        leased: dict[str, tuple[HeldKV, LeaseGrant]] = {}
        sampled_s: list[float] = []  # when the first token was sampled (loop thread, monotonic)

        def on_output(out: RequestOutput) -> None:
            sampled_s.append(time.monotonic())
            # loop thread: grant the lease before anyone can see the handle
            if out.finish_reason is FinishReason.HANDOFF:
                held = worker.engine.held[out.request_id]
                leased[out.request_id] = (held, worker.leases.grant(out.request_id, held, lease_ttl_s))
                worker.metrics.leases_granted.inc()
            deliver(out)

        def admit(engine: Engine) -> None:
            engine.add_request(
                req.request_id,
                req.original_prompt_token_ids,
                req.sampling,
                req.cache_salt,
                generated_token_ids=req.generated_token_ids,  # a migration's replay: output, not prompt
                hand_off=True,
                priority=req.priority,
                max_waiting=worker.config.max_waiting,
            )
            worker.loop.subscribe(req.request_id, recorder.wrap(on_output))

        await worker.call(admit, context)
        try:
            async with asyncio.timeout(worker.config.request_timeout_s):  # not wait_for: see decode/stream.py
                out = await q.get()
        except (asyncio.CancelledError, asyncio.TimeoutError):
            worker.leases.revoke(req.request_id)
            worker.abort_soon(req.request_id)
            raise
        if isinstance(out, DrainDeadline):  # the gateway retries the prompt on another worker
            worker.abort_soon(req.request_id)
            await context.abort(grpc.StatusCode.UNAVAILABLE, out.message)
            raise AssertionError("unreachable")
        finish_reason = out.finish_reason
        if finish_reason is None:  # the step failed and the loop aborted the request
            await context.abort(grpc.StatusCode.INTERNAL, "prefill step failed")
            raise AssertionError("unreachable")
        if finish_reason is FinishReason.ABORT:  # shed, or an Abort call, before its first token
            if out.shed_message is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, out.shed_message)
            await context.abort(grpc.StatusCode.CANCELLED, f"request {req.request_id} was aborted")
            raise AssertionError("unreachable")
        assert out.first_scheduled_s is not None  # a sampled token was scheduled
        queue_s, compute_s = self._record_stages(span, arrival, out.first_scheduled_s, sampled_s[0])
        span.set_attributes(
            {
                "gen_ai.usage.output_tokens": 1,
                "gen_ai.response.finish_reasons": (finish_reason.value,),
                "tandem.cached_tokens": out.num_cached_tokens,
            }
        )
        handle = None
        if finish_reason is FinishReason.HANDOFF:
            held, grant = leased[req.request_id]
            handle = KVHandle(
                request_id=req.request_id,
                source_worker_id=worker.config.worker_id,
                source_address=worker.address,
                block_ids=held.block_ids,
                num_tokens=held.num_tokens,
                layout=worker.layout,
                block_hashes=held.block_hashes,
                lease_deadline_unix_s=grant.deadline_unix_s,
                lease_secret=grant.secret,
                source_host_id=worker.host_id if worker.config.kv_transfer.shm else "",
            )
        return codec.PrefillResult(
            first_token=out.new_token_ids[0] if out.new_token_ids else None,  # none: max_tokens 0
            first_logprob=out.new_logprobs[0] if out.new_logprobs else None,
            finish_reason=None if handle is not None else finish_reason,
            handle=handle,
            num_cached_tokens=out.num_cached_tokens,
            queue_s=queue_s,
            compute_s=compute_s,
            prompt_logprobs=out.prompt_logprobs,
        )

    def _record_stages(
        self, span: Span, arrival: ClockAnchor, scheduled_s: float, sampled_s: float
    ) -> tuple[float, float]:
        """The queue and compute stages (monotonic seconds) as child spans; returns both."""
        tracer = self.worker.tracing.tracer
        parent = child_context(span)
        scheduled_ns = arrival.unix_ns_at(scheduled_s)
        tracer.start_span("prefill.queue", context=parent, start_time=arrival.unix_ns).end(end_time=scheduled_ns)
        compute = tracer.start_span("prefill.compute", context=parent, start_time=scheduled_ns)
        compute.end(end_time=arrival.unix_ns_at(sampled_s))
        return max(0.0, scheduled_s - arrival.monotonic_s), sampled_s - scheduled_s


def add_servicers(worker: Worker, server: grpc.aio.Server) -> None:
    pb_grpc.add_WorkerServicer_to_server(PrefillServicer(worker), server)
    worker.transport.add_source(server, worker.kv_store, worker.leases)
