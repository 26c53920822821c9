"""The Worker RPCs that both roles answer the same way: Health, Abort and Drain.

`PrefillServicer` and `DecodeServicer` subclass `WorkerServicerBase` and add their own call
(`Prefill`, `Decode`). Handlers run on the worker's asyncio thread and reach the engine only
through `Worker.call` (the step loop), like every other handler.
"""

from __future__ import annotations

from typing import Any

import grpc

from tandem.common import codec
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.worker.worker import Worker


class WorkerServicerBase(pb_grpc.WorkerServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    # Messages are protobuf objects (`Any` here): they go straight to and from the codec.
    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        worker = self.worker
        load = await worker.call(worker.snapshot, context)
        report = codec.HealthReport(
            worker_id=worker.config.worker_id,
            role=worker.config.role,
            layout=worker.layout,
            free_blocks=load.kv_blocks_total - load.kv_blocks_used,
            total_blocks=load.kv_blocks_total,
            waiting=load.waiting,
            running=load.running,
            draining=worker.draining,
            held_leases=len(worker.leases),
        )
        return codec.health_to_proto(report)

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        request_id = codec.abort_request_from_proto(request)
        released = self.worker.leases.release(request_id)
        found = await self.worker.call(lambda e: e.abort(request_id), context)
        return codec.abort_response_to_proto(bool(found) or released)

    async def Drain(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Start the drain (first call) and answer its progress; `tandem drain` polls this."""
        worker = self.worker
        await worker.start_drain()
        load, idle = await worker.call(lambda e: (worker.snapshot(e), worker.is_idle(e)), context)
        status = codec.DrainStatus(idle, load.waiting, load.running, len(worker.leases))
        return codec.drain_status_to_proto(status)
