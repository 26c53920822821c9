"""One worker process: engine + step loop + gRPC server + heartbeat + KV events + metrics.

Both roles run this; `services/tandem/prefill` and `services/tandem/decode` add their servicer.

Lifecycle:
1. `serve()` loads the engine, starts the step-loop thread, binds gRPC on the configured
   address, serves metrics, registers in Redis (heartbeat thread), and prints one JSON
   `ready` line on stdout with the bound address, the resident weight bytes and the
   quantization (also logged, and exported as the gauge `tandem_model_weight_bytes`).
2. Requests arrive on the asyncio thread and reach the engine only through the step loop.
   One that cannot be queued (a full inbox, or `max_waiting` sequences waiting and none less
   important to shed) is refused at once: RESOURCE_EXHAUSTED "worker ID is busy: ...".
   A tick on the loop thread snapshots load for the heartbeat and updates gauges (load.py), hands
   block stored/removed events to the KV-event publisher thread (kv_events.py), and hands the step's
   outputs to the asyncio thread in one call (one wake-up per step, not one per stream:
   streams.py).
   grpc.health.v1 answers on the same port: "" (liveness) is SERVING while the step loop
   runs; `tandem.v1.Worker` (readiness) is SERVING from registration until the drain
   (health.py). Every other method requires the cluster token (`plane_auth.TokenCheck`, a
   server interceptor, installed by rpc_server.py): a call without it ends UNAUTHENTICATED
   before any handler runs.
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
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2
from opentelemetry.trace import Span, SpanKind

from tandem.common.block_hash import BLOCK_HASH_VERSION, reference_block_hash
from tandem.common.cluster_state import ClusterState, connect
from tandem.common.gc_heap import freeze_startup_heap
from tandem.common.host_id import local_host_id
from tandem.common.metrics import WorkerMetrics
from tandem.common.request import Request, SamplingParams
from tandem.common.tracing import ClockAnchor, Tracing, extract_metadata
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole, draining_details
from tandem.engine.admission import WaitingQueueFullError
from tandem.engine.engine import Engine
from tandem.engine.outputs import RequestOutput
from tandem.kvtransfer.base import create_transport
from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.leases import LeaseTable
from tandem.kvtransfer.same_host import with_same_host
from tandem.worker.config import WorkerConfig
from tandem.worker.health import READINESS_SERVICE, watch_step_loop
from tandem.worker.heartbeat import Heartbeat
from tandem.worker.kv_events import KVEventPublisher
from tandem.worker.load import LoadMeter
from tandem.worker.request_metrics import RequestRecorder
from tandem.worker.rpc_server import start_rpc_server
from tandem.worker.step_loop import StepLoop, WorkerBusyError
from tandem.worker.streams import DrainDeadline, OutputQueue, OutputSink, OutputStreams

T = TypeVar("T")
log = logging.getLogger(__name__)

VERSION = "0.1.0"
END_GRACE_S = 2.0  # after the drain deadline: how long the ended streams get to abort their sequences
REDIS_TIMEOUT_S = 1.0  # a call to an unreachable Redis fails within about twice this
# While the engine has work, the load snapshot (the heartbeat's `WorkerLoad`, the load gauges)
# is taken at most this often, not after every step: its readers poll every ttl/3 s (the
# heartbeat) or every scrape. It is always taken when the engine has nothing left to run.
LOAD_SNAPSHOT_INTERVAL_S = 0.05


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        config.plane.require("a worker")  # the plane is locked by default
        self.config = config
        # a CPU prefill worker serving same-host pulls keeps its KV cache in a shared pool file
        shared = config.kv_transfer.shm and config.role is WorkerRole.PREFILL
        self.engine = Engine(config.model_dir, config.engine, config.kv_transfer.shm_dir if shared else None)
        self.loop = StepLoop(self.engine, inbox_size=config.inbox_size)
        self.layout = self.engine.kv_layout
        self.metrics = WorkerMetrics(
            config.worker_id,
            config.role.value,
            config.served_model_name or self.engine.model_dir.name,
            self.engine.max_model_len,
        )
        self.metrics.model_weight_bytes.set(self.engine.weight_bytes)
        self.metrics.cache_config(config.engine.block_size, self.engine.pool.num_blocks, config.engine.kv_cache_dtype)
        self.tracing = Tracing.create(config.tracing, f"tandem-{config.role.value}")
        self.draining = False
        self.health = health.aio.HealthServicer()
        self.address = ""
        self._load = LoadMeter(self.metrics, self.engine.pool.num_blocks)
        self._next_snapshot_s = 0.0  # time.monotonic() of the next load snapshot while stepping
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
        # Prefill role: leases on held KV. on_free may run on any thread; the blocks are freed
        # by the loop-thread tick.
        self._to_release: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.leases = LeaseTable(on_free=self._to_release.put)
        # the handlers' output queues, fed by `_tick`; every ending is counted by its reason
        self._streams = OutputStreams(self._count_finished)
        self.loop.add_tick(self._tick)
        self.kv_store = KVBlockStore(self.engine.kv_caches, self.layout)
        # published in the registration and in KV handles: equal ids hand KV over in shared memory
        self.host_id = config.kv_transfer.host_id or local_host_id(os.environ)
        transport_config = dataclasses.replace(
            config.kv_transfer, bind_host=config.advertised, token=config.plane.token, host_id=self.host_id
        )
        self.transport = with_same_host(
            create_transport(config.kv_transfer.transport, transport_config),
            transport_config,
            release_with_pull=config.role is WorkerRole.DECODE,  # one pull per hand-off, then its release
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

    async def compile_grammar(self, sampling: SamplingParams, context: grpc.aio.ServicerContext) -> None:
        """Wait (on the asyncio thread, never the step loop) until the request's grammar, if
        any, has compiled on the engine's compiler threads; a grammar that does not compile
        ends the call INVALID_ARGUMENT, naming the problem, before anything is queued."""
        if sampling.structured_output is None:
            return
        try:
            await asyncio.wrap_future(self.engine.grammars.submit(sampling.structured_output))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def output_queue(self) -> tuple[OutputQueue, Callable[[RequestOutput], None]]:
        """A queue on this asyncio loop and the loop-thread callback that feeds it. The
        callback only stages the output; the tick after the step delivers it. A
        `DrainDeadline` arrives on it if the drain deadline passes while the handler holds it."""
        return self._streams.open()

    def output_sink(self, sink: OutputSink) -> Callable[[RequestOutput], None]:
        """The loop-thread callback that feeds `sink` (asyncio thread): like `output_queue`,
        for a handler that consumes each output where it arrives (worker/streams.py)."""
        return self._streams.attach(sink)

    def request_recorder(self, req: Request, arrival: ClockAnchor, *, prefilled_elsewhere: bool) -> RequestRecorder:
        """The recorder of vLLM's per-request series for one call (request_metrics.py): subscribe
        `recorder.wrap(deliver)` on the step loop. `prefilled_elsewhere`: the call carries the
        first token a prefill worker sampled."""
        return RequestRecorder(
            self.metrics.vllm,
            arrival.monotonic_s,
            len(req.original_prompt_token_ids),
            len(req.generated_token_ids) + (1 if prefilled_elsewhere else 0),
            prefilled_elsewhere,
            req.sampling.max_tokens,
        )

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
            await context.abort(grpc.StatusCode.UNAVAILABLE, draining_details(self.config.worker_id))

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
    def _count_finished(self, out: RequestOutput) -> None:
        assert out.finish_reason is not None
        self.metrics.finished(out.finish_reason.value)

    def _tick(self, engine: Engine) -> None:
        self.metrics.vllm.flush()  # before the outputs leave: a scrape after a token counts it
        self._streams.deliver()
        for request_id in self.leases.expire(time.time()):
            self.metrics.lease_expiries.inc()
            log.info("lease of %s expired unpulled", request_id)
        self._release_pending(engine)
        now_s = time.monotonic()
        if now_s >= self._next_snapshot_s or not engine.has_unfinished():
            self._load.snapshot(engine)
            self._next_snapshot_s = now_s + LOAD_SNAPSHOT_INTERVAL_S
        self._load.count_prompt_tokens(engine)
        self._load.count_speculation(engine)
        self._load.count_steps(engine)
        self._events.collect(engine.pool)

    def is_idle(self, engine: Engine) -> bool:
        """Loop thread: nothing left to finish or hand over. A sequence whose KV pull is still
        in flight counts (the batcher does not see it yet), as does a held lease."""
        return engine.num_requests == 0 and len(self.leases) == 0

    def snapshot(self, engine: Engine) -> WorkerLoad:
        """Loop thread: current load, kept for the heartbeat and mirrored in the gauges."""
        return self._load.snapshot(engine)

    def _release_pending(self, engine: Engine) -> None:
        while not self._to_release.empty():
            engine.release_held(self._to_release.get_nowait())

    # ---- process lifecycle ----------------------------------------------------------------
    async def serve(self, add_servicers: Callable[[grpc.aio.Server], None]) -> None:
        self.loop.start()
        server, port = await start_rpc_server(self.config, self.health, add_servicers)
        self.address = f"{self.config.advertised}:{port}"
        log.info("%s: %s", self.config.worker_id, self.config.plane.describe())
        log.info(
            "%s: model weights %d bytes resident (%s)",
            self.config.worker_id,
            self.engine.weight_bytes,
            "unquantized" if self.engine.quant_plan is None else self.engine.quant_plan.describe(),
        )
        metrics_port = (
            self.metrics.serve(self.config.host, self.config.metrics_port)
            if self.config.metrics_port is not None
            else None
        )
        if self._state is not None:
            self._register(self._state)
        await self.health.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        watchdog = asyncio.create_task(watch_step_loop(self.health, lambda: self.loop.is_alive, self.config.worker_id))
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
            "weight_bytes": self.engine.weight_bytes,
            "quantization": None if self.engine.quant_plan is None else self.engine.quant_plan.describe(),
            "kv_cache_dtype": self.layout.kv_dtype,
            "kv_blocks": self.engine.pool.num_blocks,
        }
        freeze_startup_heap(self.config.worker_id)  # its full GC pauses would stall every stream
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
            kv_cache_dtype=self.config.engine.kv_cache_dtype,
            host_id=self.host_id,
        )
        self._heartbeat = Heartbeat(
            state,
            info,
            lambda: self._load.latest,
            ttl_s=self.config.heartbeat_ttl_s,
            on_reregistered=self._events.request_resync,
        )
        self._heartbeat.start()
        self._heartbeat.wait_registered(timeout_s=5.0)

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
        reason = f"its drain deadline ({self.config.drain_timeout_s} s) passed before the request finished"
        marker = DrainDeadline(draining_details(self.config.worker_id, reason))
        num_ended = self._streams.end_all(marker)
        log.warning("drain deadline of %s passed: ending %d open streams", self.config.worker_id, num_ended)


def run(worker: Worker, add_servicers: Callable[[grpc.aio.Server], None]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        # uvloop, as the gateway: a step's outputs reach the gRPC stream through a cross-thread
        # wake-up and a write completion; its loop makes both cheaper than asyncio's
        uvloop.run(worker.serve(add_servicers))
    finally:
        worker.tracing.shutdown()  # flushes spans still queued for export
    return 0
