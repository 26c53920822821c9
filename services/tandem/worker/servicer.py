"""The Worker RPCs that both roles answer the same way: Health, Abort and Drain.

`PrefillServicer` and `DecodeServicer` subclass `WorkerServicerBase` and add their own call
(`Prefill`, `Decode`). Handlers run on the worker's asyncio thread and reach the engine only
through `Worker.call` (the step loop), like every other handler.

Abort acts only for the request's owner: the submitting call recorded its owner secret
(`self.owners.claim`, see services/tandem/worker/owners.py) and the Abort call must carry the
same. Otherwise, as for an unknown id: NOT_FOUND with the same message, and no effect.
"""

from __future__ import annotations

from typing import Any

import grpc

from tandem.common import codec
from tandem.common.ownership import OWNER_METADATA_KEY
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.worker.owners import RequestOwners
from tandem.worker.worker import Worker


class WorkerServicerBase(pb_grpc.WorkerServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.owners = RequestOwners()  # who submitted each live request (Abort's check)

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
        if not self.owners.owns(request_id, context):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no live request {_shown(request_id)} submitted with this call's {OWNER_METADATA_KEY} on this worker",
            )
        return codec.abort_response_to_proto(await self.abort_owned(request_id, context))

    async def abort_owned(self, request_id: str, context: grpc.aio.ServicerContext) -> bool:
        """Abort a request for its owner: the sequence, and its lease if it has one already.
        True if either was live."""
        released = self.worker.leases.revoke(request_id)
        found = await self.worker.call(lambda e: e.abort(request_id), context)
        return bool(found) or released

    async def Drain(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Start the drain (first call) and answer its progress; `tandem drain` polls this."""
        worker = self.worker
        await worker.start_drain()
        load, idle = await worker.call(lambda e: (worker.snapshot(e), worker.is_idle(e)), context)
        status = codec.DrainStatus(idle, load.waiting, load.running, len(worker.leases))
        return codec.drain_status_to_proto(status)


def _shown(request_id: str, limit: int = codec.MAX_REQUEST_ID_CHARS) -> str:
    """A request id as an error message names it: no longer than any real id, so that a caller's
    absurd id cannot blow the reply's metadata limit (gRPC carries details in trailers)."""
    return repr(request_id) if len(request_id) <= limit else f"{request_id[:limit]!r}... ({len(request_id)} characters)"
