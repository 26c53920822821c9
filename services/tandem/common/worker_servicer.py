"""The Worker RPCs that both roles answer the same way: Health, Abort and Drain.

`PrefillServicer` and `DecodeServicer` subclass `WorkerServicerBase` and add their own call
(`Prefill`, `Decode`). Handlers run on the worker's asyncio thread and reach the engine only
through `Worker.call` (the step loop), like every other handler.
"""

from __future__ import annotations

import grpc

from tandem.common.pb import tandem_pb2 as pb
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.worker import Worker
from tandem.common.workers import WorkerRole

_ROLE_TO_PB = {WorkerRole.PREFILL: pb.WORKER_ROLE_PREFILL, WorkerRole.DECODE: pb.WORKER_ROLE_DECODE}


class WorkerServicerBase(pb_grpc.WorkerServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        worker = self.worker
        load = await worker.call(worker.snapshot, context)
        return pb.HealthResponse(
            worker_id=worker.config.worker_id,
            role=_ROLE_TO_PB[worker.config.role],
            layout_fingerprint=worker.layout.fingerprint,
            layout=worker.layout.describe(),
            free_blocks=load.kv_blocks_total - load.kv_blocks_used,
            total_blocks=load.kv_blocks_total,
            waiting=load.waiting,
            running=load.running,
            draining=worker.draining,
            held_leases=len(worker.leases),
        )

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        request_id = request.request_id
        released = self.worker.leases.release(request_id)
        found = await self.worker.call(lambda e: e.abort(request_id), context)
        return pb.AbortResponse(found=bool(found) or released)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        """Start the drain (first call) and answer its progress; `tandem drain` polls this."""
        worker = self.worker
        await worker.start_drain()
        load, idle = await worker.call(lambda e: (worker.snapshot(e), worker.is_idle(e)), context)
        return pb.DrainResponse(idle=idle, waiting=load.waiting, running=load.running, held_leases=len(worker.leases))
