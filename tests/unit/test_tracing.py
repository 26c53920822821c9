"""services/tandem/common/tracing.py: config validation, the JSON-lines file exporter, W3C context in
gRPC metadata, the no-op exporter, span ending on cancellation, and the engine timestamps the
worker spans are built from."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from tandem.common.tracing import (
    ClockAnchor,
    Tracing,
    TracingConfig,
    child_context,
    ending,
    extract_metadata,
    inject_metadata,
    request_attributes,
)
from tandem.engine import Engine, SamplingParams

LINE_KEYS = {
    "name",
    "trace_id",
    "span_id",
    "parent_span_id",
    "service_name",
    "kind",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "attributes",
    "status",
    "events",
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exporter": "jaeger"}, "tracing exporter must be one of none, otlp, file; got 'jaeger'"),
        ({"exporter": "otlp"}, r"the otlp tracing exporter needs an endpoint \(--otel-endpoint\)"),
        (
            {"exporter": "otlp", "otlp_endpoint": "collector:4317"},
            r"otlp endpoint must start with http:// \(plaintext\) or https:// \(TLS\); got 'collector:4317'",
        ),
        ({"exporter": "file"}, r"the file tracing exporter needs a path \(--otel-file\)"),
        ({"otlp_endpoint": "http://c:4317"}, "an otlp endpoint is set but the tracing exporter is 'none'"),
        (
            {"exporter": "file", "file_path": Path("x"), "otlp_endpoint": "http://c:4317"},
            "an otlp endpoint is set but the tracing exporter is 'file'",
        ),
        (
            {"exporter": "otlp", "otlp_endpoint": "http://c:4317", "file_path": Path("x")},
            "a span file is set but the tracing exporter is 'otlp'; use --otel-exporter file",
        ),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TracingConfig(**kwargs)


def test_valid_configs() -> None:
    assert TracingConfig().exporter == "none"
    assert TracingConfig("otlp", otlp_endpoint="https://c:4317").otlp_endpoint == "https://c:4317"
    assert TracingConfig("file", file_path=Path("/tmp/s.jsonl")).file_path == Path("/tmp/s.jsonl")


def test_file_exporter_writes_one_line_per_span_with_parent_links(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "spans.jsonl"
    tracing = Tracing.create(TracingConfig("file", file_path=path), "tandem-test")
    assert tracing.enabled
    tracer = tracing.tracer
    root = tracer.start_span(
        "root",
        kind=SpanKind.SERVER,
        start_time=1_000,
        attributes=request_attributes("r1", 40, SamplingParams(max_tokens=16, temperature=0.5, top_p=0.9)),
    )
    child = tracer.start_span("child", context=child_context(root), start_time=2_000)
    child.set_attribute("gen_ai.response.finish_reasons", ("length",))
    child.end(end_time=3_000)
    assert len(_lines(path)) == 1  # written when the span ends, not at shutdown
    root.end(end_time=4_000)
    tracing.shutdown()
    tracing.shutdown()  # idempotent

    child_line, root_line = _lines(path)
    assert set(root_line) == LINE_KEYS and set(child_line) == LINE_KEYS
    ctx = root.get_span_context()
    assert root_line == {
        "name": "root",
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": None,
        "service_name": "tandem-test",
        "kind": "SERVER",
        "start_time_unix_nano": 1_000,
        "end_time_unix_nano": 4_000,
        "attributes": {
            "tandem.request_id": "r1",
            "gen_ai.usage.input_tokens": 40,
            "gen_ai.request.max_tokens": 16,
            "gen_ai.request.temperature": 0.5,
            "gen_ai.request.top_p": 0.9,
        },
        "status": {"code": "UNSET", "description": None},
        "events": [],
    }
    assert child_line["trace_id"] == root_line["trace_id"]
    assert child_line["parent_span_id"] == root_line["span_id"]
    assert len(child_line["span_id"]) == 16 and child_line["span_id"] != root_line["span_id"]
    assert (child_line["kind"], child_line["start_time_unix_nano"], child_line["end_time_unix_nano"]) == (
        "INTERNAL",
        2_000,
        3_000,
    )
    assert child_line["attributes"] == {"gen_ai.response.finish_reasons": ["length"]}


def test_two_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    a = Tracing.create(TracingConfig("file", file_path=path), "svc-a")
    b = Tracing.create(TracingConfig("file", file_path=path), "svc-b")
    for i in range(50):
        a.tracer.start_span(f"a{i}").end()
        b.tracer.start_span(f"b{i}").end()
    a.shutdown()
    b.shutdown()
    lines = _lines(path)
    assert [line["name"] for line in lines] == [f"{s}{i}" for i in range(50) for s in "ab"]
    assert {line["service_name"] for line in lines[::2]} == {"svc-a"}
    assert {line["service_name"] for line in lines[1::2]} == {"svc-b"}


def test_inject_extract_round_trip_keeps_the_trace(tmp_path: Path) -> None:
    tracing = Tracing.create(TracingConfig("file", file_path=tmp_path / "s.jsonl"), "client")
    span = tracing.tracer.start_span("client")
    ctx = span.get_span_context()
    metadata = inject_metadata(child_context(span))
    assert ctx.trace_flags.sampled
    assert metadata == [("traceparent", f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}")]
    # gRPC hands metadata over as (key, value) pairs, possibly with binary values mixed in
    incoming = [("user-agent", "grpc-python"), ("x-bin", b"\x00\x01"), *metadata]
    remote = trace.get_current_span(extract_metadata(incoming)).get_span_context()
    assert (remote.trace_id, remote.span_id, remote.is_remote) == (ctx.trace_id, ctx.span_id, True)
    server_span = tracing.tracer.start_span("server", context=extract_metadata(incoming))
    assert server_span.get_span_context().trace_id == ctx.trace_id
    assert server_span.parent is not None and server_span.parent.span_id == ctx.span_id
    server_span.end()
    span.end()
    tracing.shutdown()
    assert [line["parent_span_id"] for line in _lines(tmp_path / "s.jsonl")] == [f"{ctx.span_id:016x}", None]


def test_no_context_means_no_metadata_and_a_new_trace() -> None:
    assert inject_metadata() == []
    for metadata in (None, [], [("traceparent", "garbage")]):
        assert not trace.get_current_span(extract_metadata(metadata)).get_span_context().is_valid


def test_none_exporter_records_nothing_and_passes_context_through(tmp_path: Path) -> None:
    tracing = Tracing.create(TracingConfig(), "tandem-prefill")
    assert not tracing.enabled
    incoming = [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    span = tracing.tracer.start_span("prefill", context=extract_metadata(incoming), kind=SpanKind.SERVER)
    child = tracing.tracer.start_span("prefill.queue", context=child_context(span))
    assert not span.is_recording() and not child.is_recording()
    assert inject_metadata(child_context(child)) == incoming
    child.end()
    span.end()
    tracing.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_otlp_exporter_starts_and_shuts_down_without_spans() -> None:
    tracing = Tracing.create(TracingConfig("otlp", otlp_endpoint="http://127.0.0.1:9"), "tandem-decode")
    assert tracing.enabled and tracing.tracer.start_span("x").is_recording()
    start = time.monotonic()
    tracing.shutdown()
    assert time.monotonic() - start < 5.0


def test_ending_marks_cancellation_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    tracing = Tracing.create(TracingConfig("file", file_path=path), "svc")
    with pytest.raises(asyncio.CancelledError), ending(tracing.tracer.start_span("cancelled")):
        raise asyncio.CancelledError
    with pytest.raises(KeyError), ending(tracing.tracer.start_span("failed")):
        raise KeyError("r9")
    clock = ClockAnchor(monotonic_s=time.monotonic() - 2.0, unix_ns=10**18)
    with ending(tracing.tracer.start_span("ok", start_time=10**18), clock):
        pass
    tracing.shutdown()
    cancelled, failed, ok = _lines(path)
    assert cancelled["attributes"] == {"tandem.cancelled": True}
    assert cancelled["status"] == {"code": "UNSET", "description": None}
    assert failed["status"] == {"code": "ERROR", "description": "KeyError: 'r9'"}
    assert [e["name"] for e in failed["events"]] == ["exception"]
    assert ok["status"]["code"] == "UNSET" and ok["attributes"] == {}
    assert 2.0 <= (ok["end_time_unix_nano"] - 10**18) / 1e9 < 3.0  # placed on the anchor's axis


def test_clock_anchor_places_monotonic_times() -> None:
    clock = ClockAnchor(monotonic_s=100.0, unix_ns=1_700_000_000_000_000_000)
    assert clock.unix_ns_at(100.0) == 1_700_000_000_000_000_000
    assert clock.unix_ns_at(100.25) == 1_700_000_000_250_000_000
    assert clock.unix_ns_at(99.5) == 1_699_999_999_500_000_000


def test_engine_records_first_scheduling_for_stage_timings(tiny_model_dir: Path) -> None:
    """Queue vs compute at the workers: a sequence's first scheduling time, exposed on every
    RequestOutput with its prefix-cache hit."""
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=32, max_num_seqs=1)
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 40))
    engine.add_request("a", prompt, greedy)
    engine.add_request("b", prompt, greedy)  # waits: max_num_seqs=1
    before = time.monotonic()
    (a1,) = engine.step()
    after = time.monotonic()
    assert a1.request_id == "a" and a1.first_scheduled_s is not None and before <= a1.first_scheduled_s <= after
    assert a1.num_cached_tokens == 0
    (a2,) = engine.step()
    assert a2.finished and a2.first_scheduled_s == a1.first_scheduled_s  # first, not latest, scheduling
    (b1,) = engine.step()
    assert b1.request_id == "b" and b1.first_scheduled_s is not None and b1.first_scheduled_s > after
    assert b1.num_cached_tokens == 32  # two full blocks of the same prompt, cached by "a"
    engine.step()
    assert engine.is_drained()
