"""The construction of a worker's gRPC server: interceptors, services, the bound port.

Who calls it: `Worker.serve`, once, after the step loop started. Every call but grpc.health.v1
must present the cluster token (`plane_auth.TokenCheck`, a server interceptor), checked before
anything is parsed: a call without it ends UNAUTHENTICATED before any handler runs. Then bytes
that do not parse are INVALID_ARGUMENT (`rpc_errors.DecodeErrorInterceptor`).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from tandem.common.plane_auth import server_interceptors
from tandem.kvtransfer.channels import SERVER_OPTIONS
from tandem.worker.config import WorkerConfig
from tandem.worker.rpc_errors import DecodeErrorInterceptor


async def start_rpc_server(
    config: WorkerConfig,
    health_servicer: health.aio.HealthServicer,
    add_servicers: Callable[[grpc.aio.Server], None],
) -> tuple[grpc.aio.Server, int]:
    """Build the server with the role's servicers (`add_servicers`) and `health_servicer`, bind
    `config.host:config.port` and start it. Returns the server (the caller stops it) and the
    bound port. Raises RuntimeError when the address cannot be bound."""
    interceptors = (*server_interceptors(config.plane), DecodeErrorInterceptor())
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    add_servicers(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {config.host}:{config.port}")
    await server.start()
    return server, port
