"""OpenTelemetry tracing: one trace per request across gateway, prefill and decode.

Every process holds one `Tracing` (its own `TracerProvider`, never the global one, so that
tests and embedded servers can run several side by side). Trace context crosses gRPC calls as
W3C `traceparent`/`tracestate` metadata: the caller sends `inject_metadata(ctx)`, the servicer
starts its SERVER span under `extract_metadata(context.invocation_metadata())`.

Exporters, chosen by `TracingConfig.exporter`:
- `none`: a no-op tracer. Spans are not recorded and cost nothing; an incoming trace context
  still passes through unchanged.
- `otlp`: OTLP/gRPC to `otlp_endpoint` (a collector, Jaeger, Tempo) through a batching
  processor; plaintext for `http://` endpoints, TLS for `https://`.
- `file`: JSON lines appended to `file_path`, one finished span per line, written as it ends
  with a single `write()` on an `O_APPEND` descriptor, so several processes can share a file.

A line of the file exporter (keys always present; times are Unix epoch nanoseconds)::

    {"name": "prefill.queue",
     "trace_id": "<32 lowercase hex>", "span_id": "<16 hex>",
     "parent_span_id": "<16 hex>" | null,       # null for a root span
     "service_name": "tandem-prefill",          # the Resource's service.name
     "kind": "INTERNAL" | "SERVER" | "CLIENT" | "PRODUCER" | "CONSUMER",
     "start_time_unix_nano": 1700000000000000000, "end_time_unix_nano": 1700000000001000000,
     "attributes": {"tandem.request_id": "r1", "gen_ai.request.max_tokens": 16, ...},
     "status": {"code": "UNSET" | "OK" | "ERROR", "description": "..." | null},
     "events": [{"name": "exception", "time_unix_nano": ..., "attributes": {...}}]}

Span timestamps measured on the step loop come as `time.monotonic()` seconds; `ClockAnchor`
converts them to the epoch nanoseconds that spans carry.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from tandem.common.request import SamplingParams

ExporterName = Literal["none", "otlp", "file"]
EXPORTERS: tuple[str, ...] = ("none", "otlp", "file")
_PROPAGATOR = TraceContextTextMapPropagator()  # stateless


@dataclass(frozen=True)
class TracingConfig:
    """Where this process's spans go. `otlp_endpoint` (e.g. `http://otel-collector:4317`) is
    required by, and only allowed with, `exporter="otlp"`; `file_path` likewise with `file`."""

    exporter: ExporterName = field(
        default="none",
        metadata={"flag": "otel-exporter", "help": "where OpenTelemetry spans go (default: none, no overhead)"},
    )
    otlp_endpoint: str | None = field(
        default=None,
        metadata={
            "flag": "otel-endpoint",
            "help": "OTLP/gRPC collector for --otel-exporter otlp, e.g. http://localhost:4317 "
            "(http: plaintext, https: TLS)",
        },
    )
    file_path: Path | None = field(
        default=None,
        metadata={
            "flag": "otel-file",
            "help": "for --otel-exporter file: append one JSON line per span here (shareable by processes)",
        },
    )

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"tracing exporter must be one of {', '.join(EXPORTERS)}; got {self.exporter!r}")
        if self.exporter == "otlp":
            if not self.otlp_endpoint:
                raise ValueError(
                    "the otlp tracing exporter needs an endpoint (--otel-endpoint), e.g. http://localhost:4317"
                )
            if not self.otlp_endpoint.startswith(("http://", "https://")):
                raise ValueError(
                    f"otlp endpoint must start with http:// (plaintext) or https:// (TLS); got {self.otlp_endpoint!r}"
                )
        elif self.otlp_endpoint is not None:
            raise ValueError(
                f"an otlp endpoint is set but the tracing exporter is {self.exporter!r}; use --otel-exporter otlp"
            )
        if self.exporter == "file":
            if self.file_path is None:
                raise ValueError("the file tracing exporter needs a path (--otel-file), e.g. /tmp/tandem-spans.jsonl")
        elif self.file_path is not None:
            raise ValueError(
                f"a span file is set but the tracing exporter is {self.exporter!r}; use --otel-exporter file"
            )


class Tracing:
    """One process's tracer and, unless the exporter is `none`, the provider that exports its
    spans. Created once at start-up (`create`); `shutdown()` flushes and closes the exporter
    at exit and may be called more than once. `tracer` is safe to use from any thread."""

    def __init__(self, tracer: Tracer, provider: TracerProvider | None) -> None:
        self._tracer = tracer
        self._provider = provider
        self._shut_down = False

    @classmethod
    def create(cls, config: TracingConfig, service_name: str) -> Tracing:
        if config.exporter == "none":
            return cls(trace.NoOpTracer(), None)
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(_PROCESSORS[config.exporter](config))
        return cls(provider.get_tracer("tandem"), provider)

    @property
    def tracer(self) -> Tracer:
        return self._tracer

    @property
    def enabled(self) -> bool:
        """False for the `none` exporter: spans are not recorded."""
        return self._provider is not None

    def shutdown(self) -> None:
        if self._provider is not None and not self._shut_down:
            self._shut_down = True
            self._provider.shutdown()


def inject_metadata(ctx: Context | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying the span of `ctx` (default: the current context) as W3C trace
    context; empty when there is no valid span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return list(carrier.items())


def extract_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The remote parent context from incoming gRPC metadata (keys are matched lowercase;
    binary `-bin` values are ignored). An empty context when none was sent."""
    carrier = {str(key).lower(): value for key, value in (metadata or ()) if isinstance(value, str)}
    return _PROPAGATOR.extract(carrier)


def request_attributes(request_id: str, num_prompt_tokens: int, sampling: SamplingParams) -> dict[str, AttributeValue]:
    """GenAI semantic-convention attributes of a request, plus `tandem.request_id`."""
    return {
        "tandem.request_id": request_id,
        "gen_ai.usage.input_tokens": num_prompt_tokens,
        "gen_ai.request.max_tokens": sampling.max_tokens,
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
    }


def child_context(span: Span) -> Context:
    """A context whose current span is `span`: the parent argument for its children."""
    return trace.set_span_in_context(span)


@contextmanager
def ending(span: Span, clock: ClockAnchor | None = None) -> Iterator[Span]:
    """End `span` however the block exits (at `clock`'s reading of now when given, so that it
    lines up with spans placed by that anchor). A cancellation (the client went away, or the
    stream was closed) sets `tandem.cancelled` and leaves the status unset, as for a gRPC
    CANCELLED server span; any other exception is recorded and sets the status to ERROR."""
    try:
        yield span
    except (GeneratorExit, asyncio.CancelledError):
        span.set_attribute("tandem.cancelled", True)
        raise
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        span.end(end_time=clock.unix_ns_at(time.monotonic()) if clock is not None else None)


@dataclass(frozen=True)
class ClockAnchor:
    """A `time.monotonic()` and a `time.time_ns()` reading taken together, to place monotonic
    times (what the step loop records) on the epoch-nanosecond axis of spans."""

    monotonic_s: float
    unix_ns: int

    @classmethod
    def now(cls) -> ClockAnchor:
        return cls(time.monotonic(), time.time_ns())

    def unix_ns_at(self, monotonic_s: float) -> int:
        return self.unix_ns + round((monotonic_s - self.monotonic_s) * 1e9)


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span to `path` as one JSON line (format: module docstring)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [
            (json.dumps(span_record(s), separators=(",", ":"), default=_json_default) + "\n").encode() for s in spans
        ]
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            for line in lines:
                # one write per line: O_APPEND keeps lines of concurrent writers whole
                if os.write(self._fd, line) != len(line):
                    return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every line is written (unbuffered) when its span ends


def span_record(span: ReadableSpan) -> dict[str, object]:
    """The JSON-line form of a finished span (module docstring)."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": trace.format_trace_id(ctx.trace_id),
        "span_id": trace.format_span_id(ctx.span_id),
        "parent_span_id": trace.format_span_id(parent.span_id) if parent is not None else None,
        "service_name": span.resource.attributes.get("service.name"),
        "kind": span.kind.name,
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "attributes": dict(span.attributes or {}),
        "status": {"code": span.status.status_code.name, "description": span.status.description},
        "events": [
            {"name": e.name, "time_unix_nano": e.timestamp, "attributes": dict(e.attributes or {})} for e in span.events
        ],
    }


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return dict(value)
    return str(value)


def _file_processor(config: TracingConfig) -> SpanProcessor:
    assert config.file_path is not None
    return SimpleSpanProcessor(JsonLinesSpanExporter(config.file_path))


def _otlp_processor(config: TracingConfig) -> SpanProcessor:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    assert config.otlp_endpoint is not None
    insecure = config.otlp_endpoint.startswith("http://")
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=insecure))


_PROCESSORS: Mapping[str, Callable[[TracingConfig], SpanProcessor]] = {"file": _file_processor, "otlp": _otlp_processor}
