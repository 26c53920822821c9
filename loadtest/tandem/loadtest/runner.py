"""The runner: sends a workload's requests under a load shape and collects their records.

Lifecycle of a run (`run_load`):
1. The run clock starts at 0 (`RunClock`); every record's times are seconds on it.
2. Open loop: request i is sent at its scheduled offset (`OpenLoop.send_times_s`), whether or
   not earlier requests finished. Closed loop: `concurrency` senders each take the next request
   as soon as their previous one ends.
3. The run ends when every request has a record; `duration_s` is the latest end time (at least
   a microsecond, so throughputs are defined). Records come back in workload order.

Multi-turn workloads carry synthetic assistant replies, so a turn never waits for the server's
answer to the previous turn: the runner sends requests in workload order (turn by turn).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tandem.loadtest.arrivals import ClosedLoop, LoadShape, OpenLoop
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest

MIN_DURATION_S = 1e-6


class RunClock:
    """Seconds since construction, on the monotonic performance counter."""

    def __init__(self) -> None:
        self._origin_s = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self._origin_s


class Sender(Protocol):
    """What the runner needs from a client (`StreamingClient` is one)."""

    async def send(self, request: WorkloadRequest) -> RequestRecord:
        """Send one request; never raises for server or network failures."""
        ...


@dataclass(frozen=True)
class RunResult:
    """Records in workload order and the run's duration in seconds."""

    records: tuple[RequestRecord, ...]
    duration_s: float


class ProgressBar:
    """Counts finished requests: a tqdm bar if tqdm is installed, else a stderr line."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self._total = total
        self._done = 0
        self._errors = 0
        self._enabled = enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]  # optional dependency, no stubs
            except ImportError:
                return
            self._bar = tqdm(total=total, unit="req", file=sys.stderr)

    def update(self, record: RequestRecord) -> None:
        """Count one finished request."""
        self._done += 1
        self._errors += not record.ok
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(errors=self._errors, refresh=False)
        elif self._enabled:
            print(f"\r{self._done}/{self._total} requests, {self._errors} errors", end="", file=sys.stderr)

    def close(self) -> None:
        """Finish the bar (or the line)."""
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            print(file=sys.stderr)


async def _open_loop(
    sender: Sender,
    requests: Sequence[WorkloadRequest],
    shape: OpenLoop,
    seed: int,
    clock: Callable[[], float],
    on_done: Callable[[RequestRecord], None],
) -> list[RequestRecord]:
    async def send(request: WorkloadRequest) -> RequestRecord:
        record = await sender.send(request)
        on_done(record)
        return record

    tasks = []
    for request, at_s in zip(requests, shape.send_times_s(len(requests), seed)):
        delay_s = at_s - clock()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(send(request)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(
    sender: Sender, requests: Sequence[WorkloadRequest], shape: ClosedLoop, on_done: Callable[[RequestRecord], None]
) -> list[RequestRecord]:
    records: list[RequestRecord | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))

    async def worker() -> None:
        for index in next_index:  # shared iterator: each index is taken by exactly one worker
            record = await sender.send(requests[index])
            records[index] = record
            on_done(record)

    await asyncio.gather(*(worker() for _ in range(shape.concurrency)))
    return [record for record in records if record is not None]


async def run_load(
    sender: Sender,
    requests: Sequence[WorkloadRequest],
    shape: LoadShape,
    seed: int,
    clock: Callable[[], float],
    on_done: Callable[[RequestRecord], None] = lambda record: None,
) -> RunResult:
    """Send every request under `shape`; `clock` must be the sender's clock (run seconds).

    `on_done` is called once per finished request (e.g. `ProgressBar.update`).
    """
    if isinstance(shape, OpenLoop):
        records = await _open_loop(sender, requests, shape, seed, clock, on_done)
    else:
        records = await _closed_loop(sender, requests, shape, on_done)
    duration_s = max((record.end_s for record in records), default=0.0)
    return RunResult(records=tuple(records), duration_s=max(duration_s, MIN_DURATION_S))
