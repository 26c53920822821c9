"""The gateway's ASGI application: FastAPI, with a direct path for the generation endpoints.

Why: POST /v1/completions and /v1/chat/completions carry every generation request, and a burst
of them reaches the workers only as fast as the gateway takes them in (the arrival stagger of
issue 20: a worker that starts stepping on the first request gives the last ones steps of their
own). Through FastAPI, each of them crosses six middleware layers, a route search, two exit
stacks and dependency resolution before the endpoint runs: about 35 us of CPU warm, more than
validating its body. `GatewayApp.__call__` hands these two routes to their endpoint directly.

What the direct path keeps from FastAPI's, for these endpoints (the gateway's endpoints need
no more: no dependencies, no yield, no user middleware):
- the scope as the router leaves it: `router`, and the route's own `matches` (`route`, which
  the metrics' endpoint label reads, `endpoint`, `path_params`);
- the exception handlers registered on the app, looked up by the exception's class as
  Starlette's `ExceptionMiddleware` does (an `OpenAIError` becomes its JSON answer); any other
  exception gets the app's 500 handler (a counted 500 in OpenAI's shape) and is re-raised, so
  the server logs it, as Starlette's `ServerErrorMiddleware` does; an exception after the
  response started is re-raised without an answer.
Anything else, and these routes too when the app has a root path, user middleware or FastAPI's
own OpenTelemetry instrumentation enabled (whose spans and metrics live in that stack), takes
FastAPI's full path. The routes stay registered with FastAPI, for /openapi.json and that path.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match
from starlette.types import Message, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Any]]
Handler = Callable[[Request, Exception], Response | Awaitable[Response]]  # the app's exception handlers


class GatewayApp(FastAPI):
    """A FastAPI app whose `direct` POST routes skip FastAPI's per-request stack (module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._direct: dict[str, tuple[APIRoute, Endpoint]] = {}

    def add_direct_route(self, path: str) -> None:
        """Serve the registered POST route `path` on the direct path, with its own endpoint."""
        routes = [r for r in self.routes if isinstance(r, APIRoute) and r.path == path and "POST" in (r.methods or ())]
        if len(routes) != 1:
            raise ValueError(f"{path!r} is not one registered POST route: it cannot be served directly")
        self._direct[path] = (routes[0], routes[0].endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        direct = self._direct.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if direct is None or not self._direct_allowed(scope):
            await super().__call__(scope, receive, send)
            return
        route, endpoint = direct
        scope["app"] = self
        scope.setdefault("router", self.router)
        match, child_scope = route.matches(scope)
        if match is not Match.FULL:  # cannot happen for a POST to its path; FastAPI answers whatever it is
            await super().__call__(scope, receive, send)
            return
        scope.update(child_scope)
        await self._serve(endpoint, scope, receive, send)

    def _direct_allowed(self, scope: Scope) -> bool:
        # FastAPI's native telemetry is private API; without it (older FastAPI) there is nothing to keep
        telemetry = getattr(self, "_native_telemetry", None)
        return (
            not self.root_path
            and not scope.get("root_path")
            and not self.user_middleware
            and (telemetry is None or not telemetry.enabled())
        )

    async def _serve(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
            await response(scope, receive, tracked)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is not None:
                if started:
                    raise RuntimeError("Caught handled exception, but response already started.") from exc
                await (await _answer(handler, request, exc))(scope, receive, tracked)
                exc.__traceback__ = None  # as Starlette: a reused exception would pile up tracebacks
                return
            if not started:
                await (await self._server_error(Request(scope), exc))(scope, receive, send)
            raise

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        """The answer Starlette's `ServerErrorMiddleware` gives: the app's 500 handler's, else a plain 500."""
        handler = self.exception_handlers.get(500, self.exception_handlers.get(Exception))
        if handler is None:
            return PlainTextResponse("Internal Server Error", status_code=500)
        return await _answer(handler, request, exc)

    def _handler(self, exc: Exception) -> Handler | None:
        """The handler Starlette's `ExceptionMiddleware` would pick: by status for an
        HTTPException, else by the exception's classes in order; never the 500 handler."""
        handlers = self.exception_handlers
        if isinstance(exc, HTTPException) and exc.status_code != 500 and exc.status_code in handlers:
            return handlers[exc.status_code]
        for cls in type(exc).__mro__:
            if cls is not Exception and cls in handlers:
                return handlers[cls]
        return None


async def _answer(handler: Handler, request: Request, exc: Exception) -> Response:
    """The handler's response. The gateway's handlers are coroutines; a plain function runs
    inline here (Starlette would run it in a thread)."""
    response = handler(request, exc)
    return await response if inspect.isawaitable(response) else response
