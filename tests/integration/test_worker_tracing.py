"""One trace per request across real prefill and decode workers, and the stage timings on the
wire. The workers and this test append spans to one JSON-lines file; the test plays the
gateway: a root span per request whose W3C context goes out in gRPC metadata."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from tandem.common.pb import tandem_pb2 as pb
from tandem.common.tracing import Tracing, TracingConfig, child_context, inject_metadata
from tandem.engine import SamplingParams
from tandem.engine.tiny_model import TINY_VOCAB_SIZE
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.integration.workers import (
    STOP_TIMEOUT_S,
    request_pb,
    start_worker,
    wait_until,
    worker_health,
    worker_stub,
)

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, block_size, kv heads, head_dim, fp32
WORKER_SPANS = {"prefill", "prefill.queue", "prefill.compute", "kv.pull", "decode", "decode.admit", "decode.stream"}


@dataclass
class Run:
    trace_ids: dict[str, str]  # scenario -> trace id of its root span
    spans: dict[str, dict[str, list[dict]]]  # trace id -> span name -> lines
    prefill: pb.PrefillResponse
    deltas: list[pb.DecodeDelta]
    local_deltas: list[pb.DecodeDelta]
    exit_codes: tuple[int, int]


def _decode_request(
    request_id: str, prompt: list[int], params: SamplingParams, first: pb.PrefillResponse | None
) -> pb.DecodeRequest:
    msg = pb.DecodeRequest(request=request_pb(request_id, prompt, params))
    if first is not None:
        msg.first_token = first.first_token
        msg.handle.CopyFrom(first.handle)
    return msg


def _pools_free(*workers: ChildProcess) -> bool:
    return all((h := worker_health(w)).free_blocks == h.total_blocks and not h.held_leases for w in workers)


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    path = tmp_path_factory.mktemp("trace") / "spans.jsonl"
    flags = ("--otel-exporter", "file", "--otel-file", str(path))
    p = start_worker("prefill", tiny_model_dir, *flags, worker_id="p-trace")
    d = start_worker("decode", tiny_model_dir, *flags, worker_id="d-trace")
    client = Tracing.create(TracingConfig("file", file_path=path), "tandem-test")
    tracer = client.tracer
    handoff_prompt, local_prompt, cancel_prompt = random_prompts([40, 20, 70], TINY_VOCAB_SIZE, seed=41)
    trace_ids: dict[str, str] = {}
    try:
        # 1. prefill on P, hand-off to D (its 2 full blocks pulled, the partial one recomputed)
        root = tracer.start_span("request")
        md = inject_metadata(child_context(root))
        first = worker_stub(p).Prefill(
            pb.PrefillRequest(request=request_pb("t-handoff", handoff_prompt, GREEDY)), metadata=md, timeout=60
        )
        deltas = list(
            worker_stub(d).Decode(_decode_request("t-handoff", handoff_prompt, GREEDY, first), metadata=md, timeout=60)
        )
        root.end()
        trace_ids["handoff"] = f"{root.get_span_context().trace_id:032x}"
        # 2. D prefills locally: no kv.pull
        root = tracer.start_span("request")
        md = inject_metadata(child_context(root))
        local = list(
            worker_stub(d).Decode(_decode_request("t-local", local_prompt, GREEDY, None), metadata=md, timeout=60)
        )
        root.end()
        trace_ids["local"] = f"{root.get_span_context().trace_id:032x}"
        # 3. the client cancels the stream after the first message
        root = tracer.start_span("request")
        md = inject_metadata(child_context(root))
        cfirst = worker_stub(p).Prefill(
            pb.PrefillRequest(request=request_pb("t-cancel", cancel_prompt, LONG)), metadata=md, timeout=60
        )
        stream = worker_stub(d).Decode(
            _decode_request("t-cancel", cancel_prompt, LONG, cfirst), metadata=md, timeout=60
        )
        next(stream)
        stream.cancel()
        root.end()
        trace_ids["cancel"] = f"{root.get_span_context().trace_id:032x}"
        assert wait_until(lambda: _pools_free(p, d), 5.0)
    finally:
        exit_codes = (d.stop(STOP_TIMEOUT_S), p.stop(STOP_TIMEOUT_S))
        client.shutdown()
    spans: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        record = json.loads(line)
        spans[record["trace_id"]][record["name"]].append(record)
    return Run(trace_ids, spans, first, deltas, local, exit_codes)


def _one(run: Run, scenario: str) -> dict[str, dict]:
    by_name = run.spans[run.trace_ids[scenario]]
    assert all(len(lines) == 1 for lines in by_name.values()), {n: len(v) for n, v in by_name.items()}
    return {name: lines[0] for name, lines in by_name.items()}


def test_workers_exit_cleanly(run: Run) -> None:
    assert run.exit_codes == (0, 0)


def test_handoff_is_one_trace_with_every_stage_linked(run: Run) -> None:
    s = _one(run, "handoff")
    assert set(s) == WORKER_SPANS | {"request"}
    trace_id = run.trace_ids["handoff"]
    assert {line["trace_id"] for line in s.values()} == {trace_id}
    parent = {name: line["parent_span_id"] for name, line in s.items()}
    span_id = {name: line["span_id"] for name, line in s.items()}
    assert parent == {
        "request": None,
        "prefill": span_id["request"],
        "prefill.queue": span_id["prefill"],
        "prefill.compute": span_id["prefill"],
        "decode": span_id["request"],
        "kv.pull": span_id["decode"],
        "decode.admit": span_id["decode"],
        "decode.stream": span_id["decode"],
    }
    service = {name: line["service_name"] for name, line in s.items()}
    assert service == {
        "request": "tandem-test",
        "prefill": "tandem-prefill",
        "prefill.queue": "tandem-prefill",
        "prefill.compute": "tandem-prefill",
        "decode": "tandem-decode",
        "kv.pull": "tandem-decode",
        "decode.admit": "tandem-decode",
        "decode.stream": "tandem-decode",
    }
    kind = {name: line["kind"] for name, line in s.items()}
    assert kind == {**{n: "INTERNAL" for n in s}, "prefill": "SERVER", "decode": "SERVER"}
    assert all(line["status"]["code"] == "UNSET" for line in s.values())


def test_stages_are_contiguous_in_time(run: Run) -> None:
    s = _one(run, "handoff")
    start = {name: line["start_time_unix_nano"] for name, line in s.items()}
    end = {name: line["end_time_unix_nano"] for name, line in s.items()}
    assert start["prefill.queue"] == start["prefill"]
    assert end["prefill.queue"] == start["prefill.compute"] <= end["prefill.compute"] <= end["prefill"]
    assert end["prefill"] <= start["decode"]  # the client called Decode after Prefill returned
    assert start["decode"] <= start["kv.pull"] <= end["kv.pull"] <= start["decode.admit"]
    assert end["decode.admit"] == start["decode.stream"] <= end["decode.stream"] <= end["decode"]


def test_prefill_timings_match_its_spans(run: Run) -> None:
    s = _one(run, "handoff")
    first = run.prefill
    assert first.queue_s >= 0 and first.compute_s > 0
    for field, name in (("queue_s", "prefill.queue"), ("compute_s", "prefill.compute")):
        duration_ns = s[name]["end_time_unix_nano"] - s[name]["start_time_unix_nano"]
        assert abs(getattr(first, field) * 1e9 - duration_ns) <= 2, field
    assert s["prefill"]["attributes"] == {
        "gen_ai.operation.name": "text_completion",
        "tandem.worker_id": "p-trace",
        "tandem.request_id": "t-handoff",
        "gen_ai.usage.input_tokens": 40,
        "gen_ai.request.max_tokens": 16,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 1.0,
        "gen_ai.usage.output_tokens": 1,
        "gen_ai.response.finish_reasons": ["handoff"],
        "tandem.cached_tokens": 0,
    }


def test_decode_timings_and_pull_attributes(run: Run) -> None:
    s = _one(run, "handoff")
    head, *rest = run.deltas
    assert head.num_pulled_blocks == 2 and head.transfer_s > 0 and head.admit_s >= 0
    assert all(d.transfer_s == 0 and d.admit_s == 0 for d in rest)
    pull_ns = s["kv.pull"]["end_time_unix_nano"] - s["kv.pull"]["start_time_unix_nano"]
    assert 0 <= head.transfer_s * 1e9 - pull_ns < 1e6  # transfer_s is read just after the span ends
    admit_ns = s["decode.admit"]["end_time_unix_nano"] - s["decode.admit"]["start_time_unix_nano"]
    assert abs(head.admit_s * 1e9 - admit_ns) <= 2
    assert s["kv.pull"]["attributes"] == {
        "tandem.kv.source_worker_id": "p-trace",
        "tandem.kv.blocks": 2,
        "tandem.kv.bytes": 2 * BLOCK_BYTES,
        "tandem.kv.recomputed": False,
    }
    assert s["decode"]["attributes"] == {
        "gen_ai.operation.name": "text_completion",
        "tandem.worker_id": "d-trace",
        "tandem.request_id": "t-handoff",
        "gen_ai.usage.input_tokens": 40,
        "gen_ai.request.max_tokens": 16,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 1.0,
        "tandem.cached_tokens": 0,
        "gen_ai.response.finish_reasons": ["length"],
        "gen_ai.usage.output_tokens": 15,  # the first of the 16 came from the prefill worker
    }
    assert sum(len(d.token_ids) for d in run.deltas) == 15


def test_local_prefill_has_no_pull(run: Run) -> None:
    s = _one(run, "local")
    assert set(s) == {"request", "decode", "decode.admit", "decode.stream"}
    head = run.local_deltas[0]
    assert head.transfer_s == 0 and head.admit_s >= 0 and head.num_pulled_blocks == 0
    assert s["decode"]["attributes"]["gen_ai.usage.output_tokens"] == 16
    assert s["decode"]["parent_span_id"] == s["request"]["span_id"]
    assert s["decode.admit"]["start_time_unix_nano"] == s["decode"]["start_time_unix_nano"]


def test_cancelled_stream_still_ends_its_spans(run: Run) -> None:
    s = _one(run, "cancel")
    assert set(s) == WORKER_SPANS | {"request"}
    assert s["decode"]["attributes"]["tandem.cancelled"] is True
    assert s["decode.stream"]["attributes"] == {"tandem.cancelled": True}
    assert s["decode"]["status"] == {"code": "UNSET", "description": None}
    assert "gen_ai.response.finish_reasons" not in s["decode"]["attributes"]
    assert 1 <= s["decode"]["attributes"]["gen_ai.usage.output_tokens"] < 399
    assert s["decode.stream"]["end_time_unix_nano"] <= s["decode"]["end_time_unix_nano"]
    assert s["decode"]["end_time_unix_nano"] - s["decode"]["start_time_unix_nano"] < 30 * 10**9
    assert time.time_ns() > s["decode"]["end_time_unix_nano"]
