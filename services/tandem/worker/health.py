"""A worker's grpc.health.v1 service (Kubernetes gRPC probes), served on the worker's port.

- "" (`LIVENESS_SERVICE`) is SERVING while the step-loop thread runs (`watch_step_loop`);
  NOT_SERVING once it died, so a liveness probe restarts the process.
- "tandem.v1.Worker" (`READINESS_SERVICE`) is SERVING from registration until the drain
  (set by `Worker.serve` and `Worker.start_drain`).
The health service is the one service that needs no cluster token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

LIVENESS_SERVICE = ""
READINESS_SERVICE = "tandem.v1.Worker"
LIVENESS_CHECK_INTERVAL_S = 1.0


async def watch_step_loop(servicer: health.aio.HealthServicer, is_alive: Callable[[], bool], worker_id: str) -> None:
    """Liveness: SERVING while `is_alive()` (the step-loop thread runs); NOT_SERVING once it
    returns False. Runs on the asyncio thread until cancelled or the loop died."""
    await servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    while is_alive():
        await asyncio.sleep(LIVENESS_CHECK_INTERVAL_S)
    log.error("the step loop of %s stopped; reporting NOT_SERVING", worker_id)
    await servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
