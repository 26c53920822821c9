"""One worker process: engine + step loop + gRPC server + heartbeat + KV events + metrics.

Both roles run this; `services/tandem/prefill` and `services/tandem/decode` add their servicer.

Lifecycle:
1. `serve()` loads the engine, starts the step-loop thread, binds gRPC on the configured
   address, serves metrics, registers in Redis (heartbeat thread), and prints one JSON
   `ready` line on stdout with the bound address.
2. Requests arrive on the asyncio thread and reach the engine only through the step loop.
   One that cannot be queued (a full inbox, or `max_waiting` sequences waiting and none less
   important to shed) is refused at once: RESOURCE_EXHAUSTED "worker ID is busy: ...".
   A tick on the loop thread snapshots load for the heartbeat, updates gauges, hands
   block stored/removed events to the KV-event publisher thread (kv_events.py), and hands the step's
   outputs to the asyncio thread in one call (one wake-up per step, not one per stream).
   grpc.health.v1 answers on the same port: "" (liveness) is SERVING while the step loop
   runs; `tandem.v1.Worker` (readiness) is SERVING from registration until the drain.
   Every other method requires the cluster token (`plane_auth.TokenCheck`, a server
   interceptor): a call without it ends UNAUTHENTICATED before any handler runs.
3. A `Drain` call (`tandem drain`, a Kubernetes preStop hook), SIGTERM or SIGINT starts a
   drain: the worker deregisters from Redis (gateways stop routing to it), new work is
   refused (UNAVAILABLE, which gateways retry elsewhere), running sequences finish, leases
   are released or expire. On SIGTERM/SIGINT, once idle (bounded by `drain_timeout_s`), the
   worker stops its server and exits 0. A stream still open at that deadline is ended with
   UNAVAILABLE "worker {id} is draining: ..." (a `DrainDeadline` on its output queue), which
   gateways resume on another decode worker (or retry elsewhere, for a prefill), so that a
   scale-down loses no request. Tracing is shut down (queued spans flushed) last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import signal
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.trace import Span, SpanKind

from tandem.common.block_hash import BLOCK_HASH_VERSION, reference_block_hash
from tandem.common.cluster_state import ClusterState, connect
from tandem.common.layout import KVLayout
from tandem.common.metrics import WorkerMetrics
from tandem.common.plane_auth import server_interceptors
from tandem.common.tracing import ClockAnchor, Tracing, extract_metadata
from tandem.common.workers import WorkerInfo, WorkerLoad
from tandem.engine.admission import WaitingQueueFullError
from tandem.engine.engine import Engine
from tandem.engine.outputs import RequestOutput
from tandem.kvtransfer.base import create_transport
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.channels import SERVER_OPTIONS
from tandem.kvtransfer.leases import LeaseTable
from tandem.worker.config import WorkerConfig
from tandem.worker.heartbeat import Heartbeat
from tandem.worker.kv_events import KVEventPublisher
from tandem.worker.rpc_errors import DecodeErrorInterceptor
from tandem.worker.step_loop import StepLoop, WorkerBusyError

T = TypeVar("T")
log = logging.getLogger(__name__)

VERSION = "0.1.0"
# grpc.health.v1 service names (Kubernetes gRPC probes): "" is liveness (SERVING while the
# step loop runs), READINESS_SERVICE is readiness (SERVING once registered, until the drain).
LIVENESS_SERVICE = ""
READINESS_SERVICE = "tandem.v1.Worker"
LIVENESS_CHECK_INTERVAL_S = 1.0
END_GRACE_S = 2.0  # after the drain deadline: how long the ended streams get to abort their sequences


@dataclass(frozen=True)
class DrainDeadline:
    """Put on every open output queue when the drain deadline passes: the handler ends its
    call with UNAVAILABLE and `message` (which says "is draining", the gateways' sign to
    resume the request elsewhere) and aborts its sequence."""

    message: str


REDIS_TIMEOUT_S = 1.0  # a call to an unreachable Redis fails within about twice this


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        config.plane.require("a worker")  # the plane is locked by default
        self.config = config
        self.engine = Engine(config.model_dir, config.engine)
        self.loop = StepLoop(self.engine, inbox_size=config.inbox_size)
        mc = self.engine.model_config
        self.layout = KVLayout(
            architecture=mc.architecture,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=str(mc.dtype).removeprefix("torch."),
            block_size=config.engine.block_size,
        )
        self.metrics = WorkerMetrics(config.worker_id, config.role.value)
        self.tracing = Tracing.create(config.tracing, f"tandem-{config.role.value}")
        self.draining = False
        self.health = health.aio.HealthServicer()
        self.address = ""
        self._load = WorkerLoad(0, 0, 0, 0, self.engine.pool.num_blocks, time.time())
        # The client connects on first use (registration, in `serve`).
        self._state = (
            ClusterState(connect(config.redis_url, REDIS_TIMEOUT_S), config.cluster) if config.redis_url else None
        )
        self._events = KVEventPublisher(
            self._state,
            config.worker_id,
            epoch=time.time_ns(),
            dropped=self.metrics.kv_events_dropped,
            resyncs=self.metrics.kv_event_resyncs,
        )
        self._heartbeat: Heartbeat | None = None
        self._counted = (0, 0)  # engine (prompt tokens computed, prefix hit tokens) already counted
        # Prefill role: leases on held KV. on_free may run on any thread; the blocks are freed
        # by the loop-thread tick.
        self._to_release: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.leases = LeaseTable(on_free=self._to_release.put)
        # Outputs of the current step, (stream queue, output), in delivery order; owned by the
        # loop thread, handed to the asyncio thread whole by `_tick`.
        self._outbox: list[tuple[asyncio.Queue[RequestOutput | DrainDeadline], RequestOutput]] = []
        # Every output queue a handler still holds (asyncio thread): told of the drain deadline.
        self._queues: weakref.WeakSet[asyncio.Queue[RequestOutput | DrainDeadline]] = weakref.WeakSet()
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self.loop.add_tick(self._tick)
        self.kv_store = KVBlockStore(self.engine.kv_caches, self.layout)
        self.transport = create_transport(
            config.kv_transfer.transport,
            dataclasses.replace(config.kv_transfer, bind_host=config.advertised, token=config.plane.token),
        )

    # ---- used by the role servicers --------------------------------------------------------
    @property
    def cluster_state(self) -> ClusterState | None:
        """The cluster state in Redis (None without `redis_url`). Thread-safe; blocking calls."""
        return self._state

    async def call(self, fn: Callable[[Engine], T], context: grpc.aio.ServicerContext) -> T:
        """Run `fn(engine)` on the step loop; map busy (a full inbox or waiting queue) to
        RESOURCE_EXHAUSTED, which gateways retry on another worker, and bad input to
        INVALID_ARGUMENT."""
        try:
            return await asyncio.wrap_future(self.loop.submit(fn))
        except (WorkerBusyError, WaitingQueueFullError) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker {self.config.worker_id} is busy: {exc}")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        raise AssertionError("unreachable")

    def output_queue(self) -> tuple[asyncio.Queue[RequestOutput | DrainDeadline], Callable[[RequestOutput], None]]:
        """A queue on this asyncio loop and the loop-thread callback that feeds it. The
        callback only stages the output; the tick after the step delivers it. A
        `DrainDeadline` arrives on it if the drain deadline passes while the handler holds it."""
        self._aio_loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput | DrainDeadline] = asyncio.Queue()
        self._queues.add(q)
        outbox = self._outbox
        return q, lambda out: outbox.append((q, out))

    def server_span(self, name: str, context: grpc.aio.ServicerContext, arrival: ClockAnchor) -> Span:
        """Start the SERVER span of an incoming call at `arrival`, a child of the trace context
        the caller sent in its metadata (a new trace if none). The caller ends it."""
        return self.tracing.tracer.start_span(
            name,
            context=extract_metadata(context.invocation_metadata()),
            kind=SpanKind.SERVER,
            start_time=arrival.unix_ns,
            attributes={"gen_ai.operation.name": "text_completion", "tandem.worker_id": self.config.worker_id},
        )

    async def refuse_if_draining(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.config.worker_id} is draining")

    def abort_soon(self, request_id: str) -> None:
        """Abort from a cancelled handler: best effort, never raises."""

        def abort(engine: Engine) -> None:
            if engine.abort(request_id):
                self.loop.unsubscribe(request_id)

        try:
            self.loop.submit(abort)
        except WorkerBusyError:
            log.warning("inbox full; request %s will be aborted when it next produces output", request_id)

    async def start_drain(self) -> None:
        """Begin the scale-down drain (idempotent): leave the routing set, refuse new work.

        The registration is deleted from Redis first, so gateways stop choosing this worker
        within one registry refresh; a call that raced that refresh is refused UNAVAILABLE and
        the gateway retries it on another worker. In-flight sequences and KV pulls go on.
        """
        if self.draining:
            return
        self.draining = True
        log.info("worker %s is draining", self.config.worker_id)
        await self.health.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._heartbeat is not None:
            await asyncio.to_thread(self._heartbeat.stop, True)

    # ---- loop-thread tick ---------------------------------------------------------------
    def _tick(self, engine: Engine) -> None:
        self._deliver_outputs()
        for request_id in self.leases.expire(time.time()):
            self.metrics.lease_expiries.inc()
            log.info("lease of %s expired unpulled", request_id)
        self._release_pending(engine)
        self.snapshot(engine)
        self._count_prompt_tokens(engine)
        self._events.collect(engine.pool)

    def _deliver_outputs(self) -> None:
        """Loop thread: hand every staged output to the asyncio thread in one call."""
        if not self._outbox or self._aio_loop is None:
            return
        batch = self._outbox[:]
        self._outbox.clear()  # the same list object: the callbacks hold a reference to it
        try:
            self._aio_loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the asyncio loop has closed (shutdown): no stream is left to feed
            pass

    def is_idle(self, engine: Engine) -> bool:
        """Loop thread: nothing left to finish or hand over. A sequence whose KV pull is still
        in flight counts (the batcher does not see it yet), as does a held lease."""
        return engine.num_requests == 0 and len(self.leases) == 0

    def snapshot(self, engine: Engine) -> WorkerLoad:
        """Loop thread: current load, kept for the heartbeat and mirrored in the gauges."""
        waiting = engine.batcher.waiting
        running = engine.batcher.running
        queued = sum(s.num_new_tokens for s in waiting) + sum(
            s.num_new_tokens - 1 for s in running if s.num_new_tokens > 1
        )
        pool = engine.pool
        num_waiting = engine.num_waiting  # also reserved (pulling) and pulled hand-offs: what max_waiting bounds
        load = WorkerLoad(num_waiting, len(running), queued, pool.num_used_blocks, pool.num_blocks, time.time())
        self._load = load
        self.metrics.num_requests_waiting.set(num_waiting)
        self.metrics.num_requests_running.set(len(running))
        self.metrics.queued_prefill_tokens.set(queued)
        self.metrics.kv_cache_usage_perc.set(pool.usage)
        return load

    def _count_prompt_tokens(self, engine: Engine) -> None:
        """Loop thread: mirror the engine's prompt-token counters into the Prometheus counters."""
        stats = engine.stats
        computed, hits = stats.num_prompt_tokens_computed, stats.num_prefix_hit_tokens
        self.metrics.prompt_tokens_computed.inc(computed - self._counted[0])
        self.metrics.prefix_hit_tokens.inc(hits - self._counted[1])
        self._counted = (computed, hits)

    def _release_pending(self, engine: Engine) -> None:
        while not self._to_release.empty():
            engine.release_held(self._to_release.get_nowait())

    # ---- process lifecycle ----------------------------------------------------------------
    async def serve(self, add_servicers: Callable[[grpc.aio.Server], None]) -> None:
        self.loop.start()
        # Every call but grpc.health.v1 must present the cluster token (plane_auth.py), checked
        # before anything is parsed; then bytes that do not parse are INVALID_ARGUMENT.
        interceptors = (*server_interceptors(self.config.plane), DecodeErrorInterceptor())
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        self.address = f"{self.config.advertised}:{port}"
        await server.start()
        log.info("%s: %s", self.config.worker_id, self.config.plane.describe())
        metrics_port = (
            self.metrics.serve(self.config.host, self.config.metrics_port)
            if self.config.metrics_port is not None
            else None
        )
        if self._state is not None:
            self._register(self._state)
        await self.health.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        watchdog = asyncio.create_task(self._watch_step_loop())
        self._events.start()
        stop = asyncio.Event()
        aio_loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            aio_loop.add_signal_handler(sig, stop.set)
        ready = {
            "event": "ready",
            "worker_id": self.config.worker_id,
            "role": self.config.role.value,
            "address": self.address,
            "metrics_port": metrics_port,
            "fingerprint": self.layout.fingerprint,
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stop.wait()
        await self._drain()
        watchdog.cancel()
        await self.health.enter_graceful_shutdown()
        await server.stop(grace=1.0)
        self._events.stop()
        await self.transport.close()
        self.loop.stop()

    def _register(self, state: ClusterState) -> None:
        info = WorkerInfo(
            worker_id=self.config.worker_id,
            role=self.config.role,
            address=self.address,
            fingerprint=self.layout.fingerprint,
            capacity_blocks=self.engine.pool.num_blocks,
            version=VERSION,
            block_size=self.layout.block_size,
            model_id=self.engine.model_id,
            block_hash_version=BLOCK_HASH_VERSION,
            reference_hash=reference_block_hash(self.engine.model_id, self.layout.block_size),
            kv_epoch=self._events.epoch,
        )
        self._heartbeat = Heartbeat(
            state,
            info,
            lambda: self._load,
            ttl_s=self.config.heartbeat_ttl_s,
            on_reregistered=self._events.request_resync,
        )
        self._heartbeat.start()
        self._heartbeat.wait_registered(timeout_s=5.0)

    async def _watch_step_loop(self) -> None:
        """Liveness: SERVING while the step-loop thread runs; NOT_SERVING once it died, so a
        liveness probe restarts the process."""
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        while self.loop.is_alive:
            await asyncio.sleep(LIVENESS_CHECK_INTERVAL_S)
        log.error("the step loop of %s stopped; reporting NOT_SERVING", self.config.worker_id)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _drain(self) -> None:
        """Refuse new work, let sequences finish and leases go, within drain_timeout_s; then
        end the streams still open (see `DrainDeadline`)."""
        await self.start_drain()
        if not await self._wait(self.is_idle, self.config.drain_timeout_s):
            self._end_streams()
            await self._wait(lambda e: e.num_requests == 0, END_GRACE_S)
        self.leases.release_all()
        await asyncio.wrap_future(self.loop.submit(self._release_pending))

    async def _wait(self, done: Callable[[Engine], bool], timeout_s: float) -> bool:
        """Poll `done(engine)` on the step loop until it holds or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            if await asyncio.wrap_future(self.loop.submit(done)):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    def _end_streams(self) -> None:
        """Asyncio thread, at the drain deadline: tell every open stream to end as draining."""
        queues = list(self._queues)
        marker = DrainDeadline(
            f"worker {self.config.worker_id} is draining: its drain deadline "
            f"({self.config.drain_timeout_s} s) passed before the request finished"
        )
        log.warning("drain deadline of %s passed: ending %d open streams", self.config.worker_id, len(queues))
        for q in queues:
            q.put_nowait(marker)


def run(worker: Worker, add_servicers: Callable[[grpc.aio.Server], None]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        asyncio.run(worker.serve(add_servicers))
    finally:
        worker.tracing.shutdown()  # flushes spans still queued for export
    return 0


def _put_all(batch: list[tuple[asyncio.Queue[RequestOutput | DrainDeadline], RequestOutput]]) -> None:
    """Asyncio thread: put a step's outputs on their streams' queues, in order."""
    for q, out in batch:
        q.put_nowait(out)
