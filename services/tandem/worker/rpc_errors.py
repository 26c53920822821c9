"""Undecodable requests get INVALID_ARGUMENT, not UNKNOWN and a traceback.

grpc.aio deserializes a request before the servicer runs; when the bytes do not parse, it
answers UNKNOWN "Unexpected <class 'DecodeError'>: ..." and logs a traceback per call, so any
process could fill a worker's log. `DecodeErrorInterceptor`, installed on the worker's server,
wraps every method handler that takes one request message (Prefill, Decode, Abort, Health,
Drain, PullKV, ReleaseKV, SendKV, grpc.health.v1): the handler now receives the raw bytes and
the wrapper runs the method's own deserializer. If that raises, the call ends with
INVALID_ARGUMENT "the request to METHOD does not parse: ...", one throttled warning line is
logged (no traceback), and the servicer never runs: an undecodable Drain drains nothing.
Requests that parse are handed to the servicer unchanged, which validates them (the codec).

A method that a role does not serve (Decode on a prefill worker, Prefill on a decode worker)
is the generated servicer's default, which raises NotImplementedError and logs a traceback: it
answers UNIMPLEMENTED "METHOD is not served by this worker" instead, whatever the bytes.

Order with other interceptors: put this one last (innermost), so that an interceptor that
refuses calls (the cluster token) does so before the request is even parsed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc

from tandem.common.log_throttle import LogThrottle
from tandem.common.pb import tandem_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Deserializer = Callable[[bytes], Any]


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, log_interval_s: float = 10.0) -> None:
        self._throttle = LogThrottle(log, log_interval_s)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if getattr(behavior, "__module__", None) == pb_grpc.__name__:
            return _unimplemented(method, handler)
        deserialize = self._decoder(method, handler.request_deserializer)
        if not handler.response_streaming:
            if not inspect.iscoroutinefunction(behavior):
                return handler

            async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await behavior(await deserialize(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=None, response_serializer=handler.response_serializer
            )
        stream_behavior = behavior
        if inspect.isasyncgenfunction(stream_behavior):

            async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                request = await deserialize(raw, context)
                # aclosing: a stream that gRPC closes (the client went away) closes the servicer's too
                async with aclosing(stream_behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

            wrapped: Callable[..., Any] = stream
        elif inspect.iscoroutinefunction(stream_behavior):  # writes with context.write

            async def writer(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await stream_behavior(await deserialize(raw, context), context)

            wrapped = writer
        else:
            return handler
        return grpc.unary_stream_rpc_method_handler(
            wrapped, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _decoder(
        self, method: str, deserializer: Deserializer
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def deserialize(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return deserializer(raw)
            except Exception as exc:  # protobuf's DecodeError (its base class varies by backend), or a codec check
                self._throttle.warning(
                    method, "undecodable request to %s from %s (%d bytes): %s", method, context.peer(), len(raw), exc
                )
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request to {method} does not parse: {exc}")
                raise AssertionError("unreachable") from None

        return deserialize


def _unimplemented(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler for a method the servicer left to the generated default: UNIMPLEMENTED."""

    async def refuse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served by this worker")

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, request_deserializer=None, response_serializer=None)
    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=None, response_serializer=None)
