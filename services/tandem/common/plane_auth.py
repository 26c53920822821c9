"""The internal plane's shared secret: the cluster token that every worker RPC must present.

Who holds it: every worker (its gRPC server checks the token on every call; its KV transport
presents it to its peers and proves it at a torch pair's rendezvous), every gateway, the
autoscaler, `tandem drain`, the benchmarks. `tandem up` generates one per cluster
(`ClusterToken.generate`) and hands it to its children in their environment
(`TANDEM_CLUSTER_TOKEN`), never on a command line; the Helm chart mounts it from a Secret.

The token travels in the gRPC metadata `x-tandem-token` of every call (a client interceptor adds
it: `aio_channel`, `sync_channel`), and a server interceptor (`TokenCheck`) compares it in
constant time before any handler runs: a call without it, or with another, ends UNAUTHENTICATED
and changes nothing. grpc.health.v1 (`Check`, `Watch`) stays open, for Kubernetes probes and
load balancers; it says only SERVING or NOT_SERVING. Everything else, `Worker.Health` (load
figures) included, needs the token.

`PlaneAuth` is the choice a process was started with: a token (from `--cluster-token-file`,
else `TANDEM_CLUSTER_TOKEN`, read once by the command) or, explicitly, `--insecure-no-auth`
(no token checked or sent, for a trusted network). Neither is an error at start: the plane is
locked by default. The token never appears in a repr, a log line, a metric or a trace.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import string
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "TANDEM_CLUSTER_TOKEN"
METADATA_KEY = "x-tandem-token"
MIN_TOKEN_CHARS = 16
TOKEN_BYTES = 32  # of a generated token (43 URL-safe characters)
# Methods served without a token: the standard health protocol only.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)
REFUSAL_LOG_INTERVAL_S = 10.0  # at most one log line per interval about refused calls

MISSING_MESSAGE = (
    f"this worker requires the cluster token in the metadata {METADATA_KEY!r} "
    f"(set {TOKEN_ENV} or --cluster-token-file on the caller); none was presented"
)
WRONG_MESSAGE = f"the cluster token presented in {METADATA_KEY!r} is not this cluster's"


@dataclass(frozen=True)
class ClusterToken:
    """The shared secret. Printable ASCII without spaces (it is a gRPC metadata value), at
    least MIN_TOKEN_CHARS long. Its repr hides it."""

    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, str) or not self.secret:
            raise ValueError("the cluster token is empty")
        if not set(self.secret) <= _TOKEN_CHARS:
            raise ValueError("the cluster token must be printable ASCII without spaces")
        if len(self.secret) < MIN_TOKEN_CHARS:
            raise ValueError(f"the cluster token must be at least {MIN_TOKEN_CHARS} characters long")

    @classmethod
    def generate(cls) -> ClusterToken:
        return cls(secrets.token_urlsafe(TOKEN_BYTES))

    @classmethod
    def read(cls, path: Path) -> ClusterToken:
        """The token in file `path` (surrounding whitespace stripped)."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the cluster token file {path}: {exc}") from None
        try:
            return cls(text.strip())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def matches(self, presented: str | bytes) -> bool:
        """Constant-time comparison with what a caller presented."""
        value = presented if isinstance(presented, bytes) else presented.encode("utf-8", "replace")
        return hmac.compare_digest(value, self.secret.encode())

    def proof(self, *parts: str) -> str:
        """HMAC-SHA256 of `parts`: proves knowledge of the token without revealing it."""
        message = "\x00".join(parts).encode()
        return hmac.new(self.secret.encode(), message, hashlib.sha256).hexdigest()

    def metadata(self) -> tuple[tuple[str, str]]:
        return ((METADATA_KEY, self.secret),)


@dataclass(frozen=True)
class PlaneAuth:
    """How a process authenticates on the internal plane. `token` is read by the command (from
    `cluster_token_file`, else TANDEM_CLUSTER_TOKEN: `resolve`); `insecure_no_auth` runs
    without one, explicitly. Servers call `require()` before they start."""

    cluster_token_file: Path | None = field(
        default=None,
        metadata={"help": f"file holding the internal plane's shared token (default: ${TOKEN_ENV})"},
    )
    insecure_no_auth: bool = field(
        default=False,
        metadata={"help": "run the internal gRPC plane without the cluster token (a trusted network only)"},
    )
    token: ClusterToken | None = field(
        default=None, metadata={"no_flag": f"read by the command from --cluster-token-file or {TOKEN_ENV}"}
    )

    def __post_init__(self) -> None:
        if self.token is not None and not isinstance(self.token, ClusterToken):
            raise ValueError("token must be a ClusterToken")
        if self.insecure_no_auth and (self.token is not None or self.cluster_token_file is not None):
            raise ValueError(
                f"--insecure-no-auth contradicts the cluster token given (--cluster-token-file or {TOKEN_ENV})"
            )

    def resolve(self, environ: Mapping[str, str]) -> PlaneAuth:
        """This choice with its token read: from the file if one is named, else from
        TANDEM_CLUSTER_TOKEN (if set and not empty). ValueError if the token is malformed."""
        if self.token is not None or self.insecure_no_auth:
            return self
        if self.cluster_token_file is not None:
            token = ClusterToken.read(self.cluster_token_file)
        elif environ.get(TOKEN_ENV, "").strip():
            try:
                token = ClusterToken(environ[TOKEN_ENV].strip())
            except ValueError as exc:
                raise ValueError(f"{TOKEN_ENV}: {exc}") from None
        else:
            return self
        return PlaneAuth(self.cluster_token_file, False, token)

    def require(self, who: str) -> None:
        """Refuse to start `who` (e.g. "a worker") on a locked plane without a token."""
        if self.token is None and not self.insecure_no_auth:
            raise ValueError(
                f"{who} needs the internal plane's cluster token: set {TOKEN_ENV} or "
                f"--cluster-token-file (`tandem up` generates one), or pass --insecure-no-auth "
                f"to run without authentication on a trusted network"
            )

    def describe(self) -> str:
        """One line for a log: the mode, never the token."""
        if self.token is not None:
            return "internal plane: cluster token required"
        return "internal plane: NO authentication (--insecure-no-auth)" if self.insecure_no_auth else "no token"


# ---- server side ------------------------------------------------------------------------------
Handler: TypeAlias = grpc.RpcMethodHandler


class TokenCheck(grpc.aio.ServerInterceptor):
    """Installed on a worker's grpc.aio server (and any server standing in for one). A call
    without the token, or with another, gets a handler that only aborts UNAUTHENTICATED:
    its request is not even deserialized, and the real handler never runs. That holds for
    methods the server does not have too: an unauthenticated caller learns nothing."""

    def __init__(self, token: ClusterToken) -> None:
        self._token = token
        self._refusals = _RefusalLog()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        presented = _presented(handler_call_details.invocation_metadata)
        if method in OPEN_METHODS or (presented is not None and self._token.matches(presented)):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        reason = MISSING_MESSAGE if presented is None else WRONG_MESSAGE
        return _refusal(handler, method, reason, self._refusals)


def server_interceptors(plane: PlaneAuth) -> list[grpc.aio.ServerInterceptor]:
    """What a worker's server installs: the token check, unless the plane runs insecure."""
    return [TokenCheck(plane.token)] if plane.token is not None else []


def _presented(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | bytes | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return value
    return None


class _RefusalLog:
    """Refused calls, logged at most once per REFUSAL_LOG_INTERVAL_S (never the token)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._last_s = -REFUSAL_LOG_INTERVAL_S

    def note(self, method: str, peer: str, reason: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last_s < REFUSAL_LOG_INTERVAL_S:
                return
            count, self._count, self._last_s = self._count, 0, now
        log.warning("refused %d unauthenticated call(s); latest: %s from %s: %s", count, method, peer, reason)


def _refusal(handler: Handler | None, method: str, message: str, refusals: _RefusalLog) -> Handler:
    """A handler of the same kind as `handler` (unary for an unknown method) that only aborts."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        refusals.note(method, context.peer(), message)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny)
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, response_serializer=serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, response_serializer=serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(deny, response_serializer=serializer)


# ---- client side ------------------------------------------------------------------------------
# grpc.aio files an interceptor under the first of the four kinds it is an instance of (an
# if/elif chain), so each kind needs an object of its own.
class _AioTokenDetails:
    """Adds the token to the metadata of a call on a grpc.aio channel."""

    def __init__(self, token: ClusterToken) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._token.metadata())
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AioUnaryUnary(_AioTokenDetails, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStream(_AioTokenDetails, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnary(_AioTokenDetails, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStream(_AioTokenDetails, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to the metadata of every call on a blocking channel."""

    def __init__(self, token: ClusterToken) -> None:
        self._token = token

    def _details(self, details: Any) -> Any:
        metadata = (*(details.metadata or ()), *self._token.metadata())
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def aio_channel(
    address: str, token: ClusterToken | None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to a worker whose every call presents `token` (None: none)."""
    if token is None:
        return grpc.aio.insecure_channel(address, options=options)
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    return grpc.aio.insecure_channel(address, options=options, interceptors=[kind(token) for kind in kinds])


def sync_channel(
    address: str, token: ClusterToken | None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A blocking channel to a worker whose every call presents `token` (None: none). Closing
    it closes the underlying channel."""
    channel = grpc.insecure_channel(address, options=options)
    return channel if token is None else grpc.intercept_channel(channel, _SyncTokenInterceptor(token))
