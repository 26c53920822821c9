"""The cluster-level scheduler, a library inside the gateway (DESIGN.md sections 2 and 5).

Lifecycle:
1. The gateway builds `Scheduler(state, config, events_state=...)`, calls `refresh_now()` once
   (optional: a synchronous first view of the registry) and `start()`.
2. `start()` launches two daemon threads:
   - the registry refresher: every `refresh_interval_s`, the live workers (`list_workers`)
     whose block hashes match the gateway's (registry.py: others are refused, logged once) and
     their loads (`get_loads`, one pipeline) become a new immutable `RegistrySnapshot`,
     swapped in with one reference assignment; workers that left are forgotten by the index,
     and a worker registered under a newer KV epoch than the index knows (it restarted under
     the same id) has its entries dropped at once (`PrefixIndex.registered`). Then the routing
     mode is logged if it changed, and the gateway's view (mode and refused workers) is
     published for `tandem status` (gateway_report.py).
   - the KV event follower: reads `kv_events` from `"0-0"` (rebuilds the index from what the
     stream still holds), then follows it with XREAD blocking `kv_events_block_ms`.
   Both retry Redis errors with bounded backoff, logging one line when an outage begins and
   one when it ends (`tandem.common.outage`); an error never ends a thread. While Redis is
   unreachable the last snapshot stays in use (workers cannot heartbeat either, so expiry
   cannot be told from an outage), minus the workers unconfirmed for `stale_grace_s`; right
   after it, workers missing from Redis are kept for `recovery_window_s` (registry.py,
   `Liveness`). After an outage the follower reads the stream again from `"0-0"`: a Redis that
   restarted empty has a new stream, which the workers refill under new epochs (their KV
   event publishers republish their block sets), and events already applied are skipped.
3. For each request the gateway calls `next_seq()`, then `route(request, exclude)` (routing.py); on a
   retry it calls `route` again with the failed worker excluded. For every decision it
   calls `prefill_done` once the prompt ran (or failed) and `decode_done` when the stream
   ended, so the in-flight table (inflight.py) stays exact.
4. `stop()` ends both threads (bounded join). The caller owns the Redis clients.

Ownership: `refresh_now` (on the refresher thread, or called directly at startup and in
tests) is the only writer of `_snapshot`, and replaces it whole; `route` reads one snapshot
reference per call and never sees a half-built one. The `PrefixIndex` has its own lock.
A worker whose heartbeat key expired leaves `list_workers`, so it is never chosen after its TTL
plus one refresh interval.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

import redis

from tandem.common.cluster_state import ClusterState
from tandem.common.gateway_view import RoutingMode
from tandem.common.outage import Outage
from tandem.scheduler.affinity import AffinityPolicy
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.gateway_report import GatewayReport
from tandem.scheduler.index import PrefixIndex
from tandem.scheduler.inflight import InflightTable
from tandem.scheduler.policies import Policy, make_policy
from tandem.scheduler.registry import EMPTY_SNAPSHOT, HashScheme, Liveness, RegistrationCheck, RegistrySnapshot
from tandem.scheduler.routing import prefilled_by, route_on, uncached_prefill_tokens
from tandem.scheduler.types import RouteDecision, RouteRequest, WorkerStatus

logger = logging.getLogger(__name__)

EVENTS_PER_READ = 1000
MAX_BACKOFF_S = 2.0
SOCKET_TIMEOUT_MARGIN_S = 1.0  # the events client's socket timeout must exceed block_ms by this


class Scheduler:
    """Picks the (prefill, decode) pair per request from Redis-fed state. See module docstring.

    `state` serves the refresher (short commands). `events_state` serves the follower's
    blocking XREAD: a ClusterState of the same cluster whose client's socket_timeout exceeds
    `kv_events_block_ms` by at least SOCKET_TIMEOUT_MARGIN_S (or is None). Without it, `state`
    is used, and must meet the same condition. `clock` (wall seconds) stamps snapshots and
    speculative entries. `model_id` is the gateway's (that of its block hashes): a worker
    registered with another, or with another block size (`config.block_size`) or block-hash
    version, or whose reference block hash differs, is never routed to (registry.py); None
    accepts any model id and skips the reference hash. `gateway_id` names the gateway's view in
    Redis (None: none is published).
    `route`, `next_seq`, `ready` and `workers` are thread-safe.
    The caller builds and closes the clients. Note that redis-py retries a failed command
    itself (8.x default: 10 retries, about 5 s against a dead server) before this class sees
    the error; `stop()` waits at most its `timeout_s` either way.
    """

    def __init__(
        self,
        state: ClusterState,
        config: SchedulerConfig,
        clock: Callable[[], float] = time.time,
        *,
        events_state: ClusterState | None = None,
        model_id: str | None = None,
        gateway_id: str | None = None,
    ) -> None:
        events = state if events_state is None else events_state
        if events.key_prefix != state.key_prefix:
            raise ValueError(
                f"events_state reads {events.key_prefix!r} but state reads "
                f"{state.key_prefix!r}; use one cluster name for both"
            )
        timeout_s = events.socket_timeout_s
        needed_s = config.kv_events_block_ms / 1000 + SOCKET_TIMEOUT_MARGIN_S
        if timeout_s is not None and timeout_s < needed_s:
            raise ValueError(
                f"the KV event client's socket_timeout ({timeout_s} s) must be >= {needed_s} s "
                f"(kv_events_block_ms {config.kv_events_block_ms} + {SOCKET_TIMEOUT_MARGIN_S} s): "
                "pass events_state built on a client with a longer socket_timeout"
            )
        self._state, self._events, self._config, self._clock = state, events, config, clock
        self._policy: Policy = make_policy(config.policy)
        if config.affinity_ttl_s > 0:  # session affinity in the decode pool (affinity.py)
            self._policy = AffinityPolicy(self._policy, config.affinity_max_waiting, config.affinity_max_kv_usage)
        self._index = PrefixIndex(config.speculative_ttl_s)
        self._inflight = InflightTable()
        self._snapshot = EMPTY_SNAPSHOT  # replaced whole by refresh_now, never mutated
        self._registration = RegistrationCheck(HashScheme(config.block_size, model_id))
        self._liveness = Liveness(config.stale_grace_s, config.recovery_window_s)  # refresher thread only
        self._report = GatewayReport(gateway_id, config.refresh_interval_s)  # refresher thread only
        self._registry_outage = Outage("registry refresh", logger)
        self._events_outage = Outage("kv event follow", logger)
        # ids of the workers refused at the last refresh: the follower skips their KV events,
        # whose hashes could never match (replaced whole by refresh_now, never mutated)
        self._refused: frozenset[str] = frozenset()
        self._seq = itertools.count()
        self._seq_lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._threads = (
            threading.Thread(target=self._refresh_loop, name="scheduler-registry", daemon=True),
            threading.Thread(target=self._follow_loop, name="scheduler-kv-events", daemon=True),
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the registry refresher and the KV event follower. Call once."""
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop both threads; each join waits at most until `timeout_s` from now."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    logger.warning("%s did not stop within %s s", thread.name, timeout_s)

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` until the follower has read the stream to its end once."""
        return self._caught_up.wait(timeout_s)

    # --- requests ----------------------------------------------------------------------------

    def next_seq(self) -> int:
        """The next request counter value (0, 1, 2, ...); thread-safe."""
        with self._seq_lock:
            return next(self._seq)

    def route(self, request: RouteRequest, exclude: frozenset[str] = frozenset()) -> RouteDecision:
        """Decide where `request` goes (see `route_on`). NoWorkerError: answer 503."""
        return route_on(
            self._snapshot, self._index, request, self._policy, self._config, self._clock(), exclude, self._inflight
        )

    def prefill_done(self, decision: RouteDecision, num_prompt_tokens: int) -> None:
        """The prompt of a routed request was prefilled (or failed): call once per decision."""
        self._inflight.prefill_done(
            prefilled_by(decision),
            uncached_prefill_tokens(decision, num_prompt_tokens),
            self._clock(),
            num_prompt_tokens,
        )

    def decode_done(self, decision: RouteDecision) -> None:
        """The decode stream of a routed request ended (any way): call once per decision."""
        self._inflight.decode_done(decision.decode.worker_id, self._clock())

    def routing_mode(self) -> RoutingMode:
        """How well the index knows the workers' caches now (`PrefixIndex.mode`)."""
        return self._index.mode()

    def ready(self) -> bool:
        """True when the current snapshot has at least one live decode worker."""
        return bool(self._snapshot.decode)

    def workers(self) -> tuple[WorkerStatus, ...]:
        """The current snapshot, sorted by worker id, with what the index holds per worker."""
        snapshot = self._snapshot
        views = sorted(snapshot.prefill + snapshot.decode, key=lambda view: view.info.worker_id)
        return tuple(
            WorkerStatus(
                v.info, v.load, self._index.num_blocks(v.info.worker_id), self._index.num_claims(v.info.worker_id)
            )
            for v in views
        )

    # --- registry refresher ------------------------------------------------------------------

    def refresh_now(self) -> None:
        """Read the live workers and their loads, swap in the new snapshot, and forget the
        index entries of workers that are not live. Redis errors propagate to the caller.

        A worker whose key expired and that registers again comes back with an empty view in
        the index: its later events rebuild it (the index counts the seq gap). Right after an
        outage, missing workers are kept (`Liveness.keep_missing`)."""
        # Read the index's workers BEFORE the registry: a worker registers before it publishes
        # events, so any live worker in `known` is also in `workers` and is not forgotten.
        known = self._index.worker_ids()
        workers = self._registration.accept(self._state.list_workers())
        refused = frozenset(self._registration.refused)
        loads = self._state.get_loads(w.worker_id for w in workers)
        now_s = self._clock()
        self._liveness.read(loads, now_s)
        for info in workers:
            self._index.registered(info.worker_id, info.kv_epoch)
        self._swap(self._liveness.after_read(self._snapshot, workers, loads, now_s), known)
        self._refused = refused
        self._report.update(self._state, self._index.mode(), self._registration.refused, self._index.gapped_workers())

    def _registry_unreachable(self) -> None:
        """The refresh failed: keep the snapshot, minus the workers that are no longer fresh."""
        now_s = self._clock()
        self._liveness.failed(now_s)
        snapshot, stale = self._liveness.without_stale(self._snapshot, now_s)
        if stale:
            logger.warning(
                "no heartbeat of %s confirmed for more than %g s (Redis unreachable); not routing to them",
                ", ".join(stale),
                self._config.stale_grace_s,
            )
            self._swap(snapshot, frozenset())

    def _swap(self, snapshot: RegistrySnapshot, known: frozenset[str]) -> None:
        previous = set(self._snapshot.worker_ids)
        self._snapshot = snapshot
        live = set(snapshot.worker_ids)
        if live != previous:
            logger.info("workers joined: %s; left: %s", sorted(live - previous) or "-", sorted(previous - live) or "-")
        self._liveness.retain(live)
        for worker_id in known - live:
            self._index.forget(worker_id)
        for worker_id in self._inflight.touched() - live:
            self._inflight.forget(worker_id)

    def _refresh_loop(self) -> None:
        interval_s = self._config.refresh_interval_s
        wait_s = 0.0  # first refresh at once
        while not self._stop.wait(wait_s):
            try:
                self.refresh_now()
                self._registry_outage.ok()
                wait_s = interval_s
            except Exception as exc:
                wait_s = min(MAX_BACKOFF_S, max(interval_s, 2 * wait_s))
                self._log_failure(self._registry_outage, exc, wait_s)
                self._registry_unreachable()

    # --- KV event follower -------------------------------------------------------------------

    def _follow_loop(self) -> None:
        last_id = "0-0"
        backoff_s = 0.0
        block_ms = self._config.kv_events_block_ms
        while not self._stop.is_set():
            try:
                records, last_id = self._events.read_kv_events(last_id, EVENTS_PER_READ, block_ms)
                if self._events_outage.ok() is not None:
                    logger.info("kv event follow: reading the stream again from its start")
                    records, last_id = self._events.read_kv_events("0-0", EVENTS_PER_READ, None)
                refused = self._refused
                for record in records:
                    if record.worker_id not in refused:
                        self._index.apply(record)
                if len(records) < EVENTS_PER_READ:
                    self._caught_up.set()
                self._index.expire(self._clock())
                backoff_s = 0.0
            except Exception as exc:
                backoff_s = min(MAX_BACKOFF_S, max(0.05, 2 * backoff_s))
                self._log_failure(self._events_outage, exc, backoff_s)
                self._stop.wait(backoff_s)

    @staticmethod
    def _log_failure(outage: Outage, exc: Exception, retry_in_s: float) -> None:
        if isinstance(exc, (redis.RedisError, OSError)):
            outage.failed(exc, f"retrying with backoff up to {MAX_BACKOFF_S:g} s")
        else:
            logger.exception("%s failed unexpectedly; retrying in %.2f s", outage.what, retry_in_s)
