"""The output streams of a worker's handlers: how a step's outputs reach the asyncio thread.

Who uses it: `Worker` owns one `OutputStreams`; a handler opens a queue (`Worker.output_queue`),
subscribes the returned callback on the step loop and reads its queue until the request ends.
A handler may instead attach a sink of its own (`Worker.output_sink`): anything with the
queue's `put_nowait`, called on the asyncio thread with each output in order (the multiplexed
decode stream turns each into its delta there, without a task wake-up per request).

Lifecycle of an output:
1. The loop thread runs a step; the subscribed callback only stages (queue, output) in the
   outbox (owned by the loop thread).
2. The tick after the step (`deliver`, loop thread) hands the whole outbox to the asyncio
   thread in one call: one wake-up per step, not one per stream.
3. The asyncio thread puts each output on its stream's queue (or sink), in order (`_put_all`).
4. At the worker's drain deadline (`end_all`, asyncio thread) every queue a handler still
   holds gets a `DrainDeadline`: its handler ends the call UNAVAILABLE "worker {id} is
   draining: ...", which gateways resume on another worker.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from tandem.engine.outputs import RequestOutput


@dataclass(frozen=True)
class DrainDeadline:
    """Put on every open output queue when the drain deadline passes: the handler ends its
    call with UNAVAILABLE and `message` (which says "is draining", the gateways' sign to
    resume the request elsewhere) and aborts its sequence."""

    message: str


OutputQueue: TypeAlias = asyncio.Queue[RequestOutput | DrainDeadline]


class OutputSink(Protocol):
    """Where a handler's outputs go (an `OutputQueue` is one): `put_nowait` is called on the
    asyncio thread with each output of the request, in order, and with a `DrainDeadline`."""

    def put_nowait(self, item: RequestOutput | DrainDeadline) -> None: ...


class OutputStreams:
    """Every output queue of one worker, and the outbox that feeds them."""

    def __init__(self, on_finish: Callable[[RequestOutput], None] | None = None) -> None:
        """`on_finish(output)` is called on the loop thread for each output that ends its
        request (the worker counts them by reason)."""
        self._on_finish = on_finish
        # Outputs of the current step, (stream queue, output), in delivery order; owned by the
        # loop thread, handed to the asyncio thread whole by `deliver`.
        self._outbox: list[tuple[OutputSink, RequestOutput]] = []
        # Every output queue or sink a handler still holds (asyncio thread): told of the drain deadline.
        self._queues: weakref.WeakSet[OutputSink] = weakref.WeakSet()
        self._aio_loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> tuple[OutputQueue, Callable[[RequestOutput], None]]:
        """Asyncio thread: a queue on the running loop and the loop-thread callback that feeds
        it. The callback only stages the output; the tick after the step delivers it."""
        q: OutputQueue = asyncio.Queue()
        return q, self.attach(q)

    def attach(self, sink: OutputSink) -> Callable[[RequestOutput], None]:
        """Asyncio thread: the loop-thread callback that feeds `sink` (staged, then delivered
        by the tick after the step, like a queue's)."""
        self._aio_loop = asyncio.get_running_loop()
        self._queues.add(sink)
        outbox = self._outbox
        return lambda out: outbox.append((sink, out))

    def deliver(self) -> None:
        """Loop thread: hand every staged output to the asyncio thread in one call."""
        if not self._outbox or self._aio_loop is None:
            return
        batch = self._outbox[:]
        self._outbox.clear()  # the same list object: the callbacks hold a reference to it
        if self._on_finish is not None:
            for _, out in batch:
                if out.finish_reason is not None:
                    self._on_finish(out)
        try:
            self._aio_loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the asyncio loop has closed (shutdown): no stream is left to feed
            pass

    def end_all(self, marker: DrainDeadline) -> int:
        """Asyncio thread: put `marker` on every queue or sink a handler still holds; how many."""
        queues = list(self._queues)
        for q in queues:
            q.put_nowait(marker)
        return len(queues)


def _put_all(batch: list[tuple[OutputSink, RequestOutput]]) -> None:
    """Asyncio thread: put a step's outputs on their streams' queues (or sinks), in order."""
    for q, out in batch:
        q.put_nowait(out)
