"""The client side of a worker's scale-down drain (`tandem drain`, Kubernetes preStop).

Who calls it: an operator, the Helm chart's `preStop` hook, and actuators that remove a worker
they can reach only over the network. What it does: calls `Worker.Drain` (the first call starts
the drain: the worker leaves the routing set in Redis and refuses new work), then polls the
same call until the worker reports `idle` (no sequences, no held leases) or `timeout_s`
passes. It never stops the process: after a preStop hook, Kubernetes sends SIGTERM and the
already idle worker exits at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from tandem.common import codec
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.plane_auth import ClusterToken, sync_channel

DEFAULT_POLL_INTERVAL_S = 0.2
RPC_TIMEOUT_S = 5.0


class DrainError(RuntimeError):
    """The worker could not be asked to drain (unreachable, or it answered an error)."""


@dataclass(frozen=True)
class DrainProgress:
    """The worker's last answer to `Drain`, and how long the drain has been watched."""

    idle: bool
    waiting: int
    running: int
    held_leases: int
    elapsed_s: float


def drain_worker(
    address: str,
    timeout_s: float,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    token: ClusterToken | None = None,
) -> DrainProgress:
    """Drain the worker at `address` (host:port) and wait up to `timeout_s` until it is idle.
    Every call presents `token`, the cluster token (None: an insecure plane).

    Returns the last progress (`idle` False when the time ran out). Raises `DrainError` when
    the worker cannot be reached or refuses the call.
    """
    if not address or ":" not in address:
        raise ValueError(f"address must be host:port, got {address!r}")
    if timeout_s <= 0 or poll_interval_s <= 0:
        raise ValueError("timeout_s and poll_interval_s must be > 0")
    start = time.monotonic()
    with sync_channel(address, token) as channel:
        stub = pb_grpc.WorkerStub(channel)
        while True:
            elapsed_s = time.monotonic() - start
            try:
                reply = stub.Drain(codec.drain_request_to_proto(), timeout=RPC_TIMEOUT_S)
                status = codec.drain_status_from_proto(reply)
            except grpc.RpcError as exc:
                raise DrainError(f"Drain on {address} failed: {exc.code().name}: {exc.details()}") from exc
            progress = DrainProgress(status.idle, status.waiting, status.running, status.held_leases, elapsed_s)
            if progress.idle or elapsed_s >= timeout_s:
                return progress
            time.sleep(min(poll_interval_s, max(0.0, timeout_s - elapsed_s)))
