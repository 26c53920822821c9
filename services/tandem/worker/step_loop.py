"""The worker's step loop: one dedicated thread, the only code that touches the engine.

Who calls what (DESIGN.md section 6b):
- gRPC handlers (asyncio thread) call `submit(fn)`: `fn(engine)` runs on the loop thread
  between steps and its result comes back through a `concurrent.futures.Future`. A full
  inbox raises `WorkerBusyError` at once: never a silent, growing queue.
- Handlers that stream call `subscribe(request_id, callback)` from inside a submitted
  function (so no output can be missed); the loop calls `callback(output)` on its thread
  after each step, and drops the subscription when the request finishes. A request that the
  engine finishes outside a step (an `Abort`, a shed under overload) gets its final output
  (finish reason ABORT) right after the commands that ended it: no stream waits for a timeout.
- `tick` functions run on the loop thread once per iteration (lease expiry, load snapshots).

Lifecycle: `start()` -> steps while there is work, waits on the inbox (bounded) when idle ->
`stop()` drains the inbox, ends the thread (bounded join).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from tandem.engine.engine import Engine
from tandem.engine.outputs import RequestOutput

T = TypeVar("T")
log = logging.getLogger(__name__)


class WorkerBusyError(RuntimeError):
    """The worker's inbox is full; the caller should retry elsewhere or later."""


class StepLoop:
    def __init__(self, engine: Engine, inbox_size: int = 1024, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._inbox: queue.Queue[tuple[Callable[[Engine], object], Future]] = queue.Queue(maxsize=inbox_size)
        self._subscribers: dict[str, Callable[[RequestOutput], None]] = {}
        self._ticks: list[Callable[[Engine], None]] = []
        self._idle_wait_s = idle_wait_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def add_tick(self, fn: Callable[[Engine], None]) -> None:
        """Register a function run once per loop iteration. Call before `start()`."""
        self._ticks.append(fn)

    def submit(self, fn: Callable[[Engine], T]) -> Future[T]:
        future: Future[T] = Future()
        try:
            self._inbox.put_nowait((fn, future))
        except queue.Full:
            raise WorkerBusyError(f"inbox is full ({self._inbox.maxsize} pending)") from None
        return future

    def subscribe(self, request_id: str, callback: Callable[[RequestOutput], None]) -> None:
        """Loop thread only (inside a submitted function)."""
        self._subscribers[request_id] = callback

    def unsubscribe(self, request_id: str) -> None:
        """Loop thread only."""
        self._subscribers.pop(request_id, None)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:  # handed to the caller, never kills the loop
                    future.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            self._deliver(self.engine.take_aborted())
            if self.engine.has_unfinished():
                self._step()
            # after the step: load, metrics and KV events reflect it before the loop idles
            for tick in self._ticks:
                try:
                    tick(self.engine)
                except Exception:
                    log.exception("step-loop tick failed")
        self._run_commands(block=False)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; aborting the running requests")
            self._fail_all()
            return
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its subscriber; a finished request's subscription ends."""
        for out in outputs:
            callback = self._subscribers.get(out.request_id)
            if callback is not None:
                callback(out)
            if out.finished:
                self._subscribers.pop(out.request_id, None)

    def _fail_all(self) -> None:
        """A step raised: abort everything in flight so that no client waits forever."""
        for request_id, callback in list(self._subscribers.items()):
            self.engine.abort(request_id)
            callback(RequestOutput(request_id, (), (), None))
        self._subscribers.clear()
        self.engine.take_aborted()  # their subscribers were told above
