"""The multiplexed decode stream, gateway side: one long-lived `DecodeStream` per decode worker,
shared by every request this gateway sends there (the worker side: decode/mux.py).

Lifecycle of a connection (`MuxConnection`, one per worker address, held by `WorkerClients`):
1. Opened on the first request to the worker; later requests reuse it while it is healthy.
2. `submit` registers the request's `RequestStream` (a bounded buffer) and queues a
   `MuxSubmit`; one writer task sends what is queued, in order (packed in a `MuxBatch` when
   several are waiting).
3. One reader task reads each `MuxStep` and hands every output to its request's buffer. An
   output for a request not live here (cancelled a moment ago) is dropped.
4. `release(request_id)` ends the request here; if the worker has not ended it, a `MuxCancel`
   goes out, so the worker aborts the sequence within one step.
5. The stream breaks (the worker died or stopped, the channel closed) or the worker sends a
   malformed message: every live request gets the error (a `grpc.aio.AioRpcError`, as a
   per-request Decode call would raise) and the connection is dead; the next request opens a
   new one.

Backpressure, per request: a request's buffer holds at most `max_buffered` messages. When it is
full, a new output is merged into the last buffered message (its tokens and logprobs appended),
so a consumer that is only briefly behind (its task had no turn while the loop served others)
loses nothing and is not aborted. A buffer that stays full for `full_timeout_s` overflows: the
request is cancelled on the worker and its reader gets `BufferOverflow` once it has read what
was buffered. The tokens held are bounded by the request's max_tokens, the time by the timeout,
the same rule as the gateway's slow-client bound. The reader task never waits for a request, so
a slow request never delays the others.

Asyncio loop only; not thread-safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable

import grpc

from tandem.common import codec, mux_codec
from tandem.common.pb import tandem_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class BufferOverflow(Exception):
    """A request's buffer overflowed (its consumer stopped reading); it was cancelled."""


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The exception a per-request Decode call would raise with this status."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class RequestStream:
    """One request's outputs, in order, then the end: a final delta, an error or an overflow."""

    def __init__(
        self,
        request_id: str,
        max_buffered: int,
        full_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request_id = request_id
        self._max_buffered = max_buffered
        self._full_timeout_s = full_timeout_s
        self._clock = clock
        self._full_since: float | None = None  # when the buffer was last found full
        self._items: deque[codec.DecodeDelta] = deque()
        self._end: BaseException | None = None
        self._wakeup = asyncio.Event()
        self.finished = False  # the worker ended the request (final delta or error)

    def push(self, output: mux_codec.MuxOutput) -> bool:
        """Buffer an output, merged into the last message when the buffer is full; False
        (nothing buffered) once the buffer has stayed full for `full_timeout_s`."""
        if self._end is not None:
            return True
        if output.delta is None:
            self.finished = True
            self.fail(rpc_error(_CODES[output.error_code], output.error_details))
            return True
        delta = output.delta
        if len(self._items) >= self._max_buffered and not delta.failed:  # a failure always gets its own message
            now = self._clock()
            if self._full_since is None:
                self._full_since = now
            elif now - self._full_since >= self._full_timeout_s:
                return False
            last = self._items[-1]
            delta = dataclasses.replace(
                last,
                token_ids=last.token_ids + delta.token_ids,
                logprobs=last.logprobs + delta.logprobs,
                finish_reason=delta.finish_reason,
            )
            self._items.pop()
        if delta.finish_reason is not None or delta.failed:
            self.finished = True
        self._items.append(delta)
        self._wakeup.set()
        return True

    def fail(self, exc: BaseException) -> None:
        """End the request with `exc`, raised by `get` after the buffered outputs."""
        if self._end is None:
            self._end = exc
            self._wakeup.set()

    async def get(self, timeout_s: float) -> codec.DecodeDelta:
        """The next delta; raises the request's error once nothing is buffered, and
        `asyncio.TimeoutError` after `timeout_s` without anything."""
        while not self._items:
            if self._end is not None:
                raise self._end
            self._wakeup.clear()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the task's
            # cancellation when the wait completes at the same moment
            async with asyncio.timeout(timeout_s):
                await self._wakeup.wait()
        self._full_since = None
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class MuxConnection:
    """The `DecodeStream` to one decode worker (see the module docstring)."""

    def __init__(self, stub: pb_grpc.WorkerStub, address: str, max_buffered: int, full_timeout_s: float) -> None:
        self.address = address
        self._max_buffered = max_buffered
        self._full_timeout_s = full_timeout_s
        self._requests: dict[str, RequestStream] = {}
        self._outbox: asyncio.Queue[mux_codec.ClientMessage] = asyncio.Queue()
        self._call = stub.DecodeStream()
        self.error: grpc.aio.AioRpcError | None = None  # set once the stream is dead
        self.num_steps = 0  # MuxSteps received
        self.num_outputs = 0  # outputs in them
        self.num_writes = 0  # messages sent (a MuxBatch counts once)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._writer = asyncio.get_running_loop().create_task(self._write())

    @property
    def alive(self) -> bool:
        return self.error is None

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def submit(self, submit: mux_codec.MuxSubmit) -> RequestStream:
        """Send a decode request; read its outputs from the returned stream and `release` it
        however it ends. A dead connection's stream raises its error at once."""
        rid = submit.call.request.request_id
        if rid in self._requests:
            raise ValueError(f"request {rid!r} is already live on the decode stream to {self.address}")
        stream = RequestStream(rid, self._max_buffered, self._full_timeout_s)
        if self.error is not None:
            stream.fail(self.error)
            return stream
        self._requests[rid] = stream
        self._outbox.put_nowait(mux_codec.mux_submit_to_proto(submit))
        return stream

    def release(self, stream: RequestStream) -> None:
        """The request is over here; cancel it on the worker unless the worker ended it."""
        if self._requests.get(stream.request_id) is not stream:
            return
        del self._requests[stream.request_id]
        if not stream.finished and self.error is None:
            self._outbox.put_nowait(mux_codec.mux_cancel_to_proto(stream.request_id))

    async def close(self) -> None:
        """Fail the live requests (CANCELLED) and end the stream."""
        self._fail_all(rpc_error(grpc.StatusCode.CANCELLED, f"the decode stream to {self.address} was closed"))
        self._call.cancel()
        for task in (self._reader, self._writer):
            task.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    async def _write(self) -> None:
        """Send what is queued, in order: what queued up while the last write was under way
        goes out packed (`MuxBatch`), so a burst costs the worker a read, not one per request;
        a lone message goes at once, as it is."""
        try:
            while True:
                queued = [await self._outbox.get()]
                while not self._outbox.empty():
                    queued.append(self._outbox.get_nowait())
                for msg in mux_codec.mux_batches_to_proto(queued):
                    await self._call.write(msg)
                    self.num_writes += 1
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:  # the reader sees the break too
            log.info("writing to the decode stream of %s failed: %r", self.address, exc)

    async def _read(self) -> None:
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"the decode stream from {self.address} ended")
                try:
                    outputs = mux_codec.mux_step_from_proto(msg)
                except ValueError as exc:
                    self._call.cancel()
                    raise rpc_error(
                        grpc.StatusCode.INTERNAL, f"decode worker {self.address} sent a malformed step: {exc}"
                    ) from None
                self.num_steps += 1
                self.num_outputs += len(outputs)
                self._dispatch(outputs)
        except grpc.aio.AioRpcError as exc:
            self._fail_all(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never leave a request waiting on a dead reader
            log.exception("the decode stream reader of %s failed", self.address)
            self._fail_all(rpc_error(grpc.StatusCode.INTERNAL, f"decode stream of {self.address}: {exc!r}"))

    def _dispatch(self, outputs: list[mux_codec.MuxOutput]) -> None:
        for out in outputs:
            stream = self._requests.get(out.request_id)
            if stream is None:
                continue  # released here a moment ago; the worker has it cancelled
            if not stream.push(out):
                log.warning(
                    "request %s read its decode output too slowly (%d messages buffered): aborting it",
                    out.request_id,
                    len(stream),
                )
                self.release(stream)
                stream.fail(
                    BufferOverflow(
                        f"the request read its output too slowly: its buffer of {self._max_buffered} decode "
                        f"messages stayed full for {self._full_timeout_s:g} s, so it was aborted"
                    )
                )
            elif stream.finished:
                del self._requests[out.request_id]

    def _fail_all(self, exc: grpc.aio.AioRpcError) -> None:
        if self.error is None:
            self.error = exc
        requests, self._requests = self._requests, {}
        for stream in requests.values():
            stream.fail(exc)
