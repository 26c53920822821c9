"""The worker heartbeat: keeps a worker's registration and load fresh in Redis.

Owner: the worker process; runs in its own daemon thread so Redis is never on the step loop.

Redis outages: the worker keeps serving. A failed tick is retried every `retry_interval_s`
(short), not every `interval_s`, so that the worker is registered again as soon as Redis
answers: after a freeze longer than the TTL its key has expired, and after a restart Redis is
empty. Gateways keep routing to a worker they saw within their grace period meanwhile
(`SchedulerConfig.stale_grace_s`), so a short outage is invisible to clients. The outage is
logged once when it begins and once when it ends (`tandem.common.outage`), not per tick.
A registration found gone calls `on_reregistered` (the KV event publisher then republishes
the worker's whole block set under a new epoch: the stream may have been lost with it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from tandem.common.cluster_state import DEFAULT_TTL_S, ClusterState, ttl_to_ms
from tandem.common.outage import Outage
from tandem.common.workers import WorkerInfo, WorkerLoad

logger = logging.getLogger(__name__)

DEFAULT_RETRY_INTERVAL_S = 0.2


class Heartbeat:
    """Keeps one worker registered and its load published, from a daemon thread.

    The worker process creates it after its gRPC server listens, calls `start()`, and calls
    `stop()` when it drains. Each tick (every `interval_s`, default `ttl_s / 3`): register if
    not yet registered or if the key expired, else refresh the TTL; then publish `load_fn()`.
    `load_fn` runs on this thread, so it must only read thread-safe counters of the engine.
    A Redis error is retried after `retry_interval_s` (at most `interval_s`); `load_fn` errors
    on the next tick; neither ends the thread. `on_reregistered` runs on this thread each time
    the registration was found gone and was written again.
    """

    def __init__(
        self,
        state: ClusterState,
        info: WorkerInfo,
        load_fn: Callable[[], WorkerLoad],
        ttl_s: float = DEFAULT_TTL_S,
        interval_s: float | None = None,
        *,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
        on_reregistered: Callable[[], None] | None = None,
    ) -> None:
        ttl_to_ms(ttl_s)
        interval_s = ttl_s / 3 if interval_s is None else interval_s
        if not 0 < interval_s < ttl_s:
            raise ValueError(f"interval_s must be in (0, ttl_s={ttl_s}), got {interval_s}")
        if not retry_interval_s > 0:
            raise ValueError(f"retry_interval_s must be > 0, got {retry_interval_s}")
        self._state, self._info, self._load_fn = state, info, load_fn
        self._ttl_s, self._interval_s = ttl_s, interval_s
        self._retry_interval_s = min(retry_interval_s, interval_s)
        self._on_reregistered = on_reregistered
        self._outage = Outage(f"heartbeat of {info.worker_id}", logger)
        self.num_reregistrations = 0
        self._stop = threading.Event()
        self._registered = threading.Event()  # set after the first successful registration
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{info.worker_id}", daemon=True)

    def start(self) -> None:
        """Start the thread; the first tick runs at once. Call once."""
        self._thread.start()

    def wait_registered(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` until the worker has been registered once."""
        return self._registered.wait(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, deregister: bool = True, timeout_s: float = 5.0) -> None:
        """Stop the thread (join bounded by `timeout_s`), then delete the keys if `deregister`."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("heartbeat thread of %s did not stop within %s s", self._info.worker_id, timeout_s)
        if deregister:
            try:
                self._state.deregister(self._info.worker_id)
            except (redis.RedisError, OSError) as exc:
                logger.warning("could not deregister %s: %s", self._info.worker_id, exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            ok = self._tick()
            self._stop.wait(self._interval_s if ok else self._retry_interval_s)

    def _tick(self) -> bool:
        """One beat; False if Redis failed (retry soon)."""
        worker_id = self._info.worker_id
        lost = False
        try:
            if not self._registered.is_set():
                self._state.register(self._info, self._ttl_s)
                self._registered.set()
                logger.info("registered %s (%s)", worker_id, self._info.role.value)
            elif not self._state.heartbeat(worker_id, self._ttl_s):
                lost = True
                logger.warning(
                    "registration of %s was gone (expired, or Redis restarted); registering again", worker_id
                )
                self._state.register(self._info, self._ttl_s)
                self.num_reregistrations += 1
            self._state.publish_load(worker_id, self._load_fn(), self._ttl_s)
        except (redis.RedisError, OSError) as exc:
            self._outage.failed(exc, f"the worker keeps serving; retrying every {self._retry_interval_s:g} s")
            return False
        except Exception:  # load_fn is caller code; a bug there must not stop the heartbeat
            logger.exception("load_fn of %s failed", worker_id)
        self._outage.ok()
        if lost and self._on_reregistered is not None:
            self._on_reregistered()
        return True
