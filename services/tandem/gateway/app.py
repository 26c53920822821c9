"""The gateway's HTTP surface: FastAPI routes of the OpenAI API and the operational endpoints.

`create_app(state)` registers, in this order: the error handlers (an `OpenAIError` or a
Starlette HTTP error becomes OpenAI's error body; any other exception a 500 in the same shape,
counted in the request metrics), the operational endpoints (/health, /ready, /metrics), the
model endpoints (/v1/models, /tokenize, /detokenize) and the generation endpoints
(/v1/completions, /v1/chat/completions, served by `serving.serve_generation` on the direct path
of `asgi.GatewayApp`, past FastAPI's per-request stack). The lifespan is
`GatewayState.lifespan`. Every endpoint except the operational ones authenticates.
`/openapi.json` documents every endpoint, its body model and its error responses (openapi.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.gateway import openapi, protocol, responses
from tandem.gateway.asgi import GatewayApp
from tandem.gateway.bodies import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from tandem.gateway.errors import OpenAIError, internal_error
from tandem.gateway.serving import endpoint_label, read_body, serve_generation
from tandem.gateway.state import GatewayState


def create_app(state: GatewayState) -> GatewayApp:
    app = GatewayApp(
        title="Tandem gateway", lifespan=state.lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    _add_error_handlers(app, state)
    _add_operational_routes(app, state)
    _add_model_routes(app, state)
    _add_generation_routes(app, state)
    openapi.install(app)
    return app


def _add_error_handlers(app: FastAPI, state: GatewayState) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        if not getattr(request.state, "counted", False):
            state.metrics.request_done(endpoint_label(request), exc.status_code)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=dict(exc.headers))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = OpenAIError(exc.status_code, str(exc.detail), "invalid_request_error", None, exc.status_code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug: 500 in OpenAI's shape, counted. Starlette re-raises it afterwards, so the server
        logs its traceback; the client sees no internals."""
        err = internal_error()
        if not getattr(request.state, "counted", False):
            state.metrics.request_done(endpoint_label(request), err.status_code)
        return JSONResponse(err.body(), status_code=err.status_code)


def _add_operational_routes(app: FastAPI, state: GatewayState) -> None:
    """Unauthenticated: liveness, readiness (a routable decode worker) and Prometheus metrics."""

    @app.get("/health", response_class=Response, responses={200: {"description": "Alive; the body is empty."}})
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/ready", responses=openapi.READY)
    async def ready() -> JSONResponse:
        if state.scheduler.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {"status": "no routable decode worker"},
            status_code=503,
            headers={"Retry-After": str(state.config.retry_after_s)},
        )

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"description": "Prometheus text format.", "content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        state.update_pool_gauges()
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)


def _add_model_routes(app: FastAPI, state: GatewayState) -> None:
    """The served model and its tokenizer (vLLM's /tokenize and /detokenize)."""
    served, max_body_bytes = state.served, state.config.max_body_bytes

    @app.get("/v1/models", responses=openapi.ERRORS)
    async def models(request: Request) -> JSONResponse:
        state.authenticate(request)
        return JSONResponse(responses.models_response(served.name, served.max_model_len, state.created))

    @app.post("/tokenize", openapi_extra=openapi.request_body(TokenizeRequest), responses=openapi.ERRORS)
    async def tokenize(request: Request) -> JSONResponse:
        state.authenticate(request)
        ids = protocol.tokenize_body(await read_body(request, max_body_bytes), served)
        return JSONResponse({"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids})

    @app.post("/detokenize", openapi_extra=openapi.request_body(DetokenizeRequest), responses=openapi.ERRORS)
    async def detokenize(request: Request) -> JSONResponse:
        state.authenticate(request)
        return JSONResponse({"prompt": protocol.detokenize_body(await read_body(request, max_body_bytes), served)})


def _add_generation_routes(app: GatewayApp, state: GatewayState) -> None:
    """The generation endpoints, served on the app's direct path (asgi.py) past FastAPI's stack."""

    @app.post(
        "/v1/completions",
        openapi_extra=openapi.request_body(CompletionRequest),
        responses={**openapi.GENERATION_OK, **openapi.ERRORS},
    )
    async def completions(request: Request) -> Response:
        return await serve_generation(state, request, chat=False)

    @app.post(
        "/v1/chat/completions",
        openapi_extra=openapi.request_body(ChatCompletionRequest),
        responses={**openapi.GENERATION_OK, **openapi.ERRORS},
    )
    async def chat_completions(request: Request) -> Response:
        return await serve_generation(state, request, chat=True)

    app.add_direct_route("/v1/completions")
    app.add_direct_route("/v1/chat/completions")
