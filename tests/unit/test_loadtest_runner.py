"""loadtest runner and CLI: open-loop requests start on schedule, closed loop keeps exactly
`concurrency` in flight, and `python -m tandem.loadtest run` against a fake OpenAI server on a free
loopback port writes results.json and summary.md that read back exactly, and the two plots; a
concurrency sweep writes one run per level and a summary comparing them."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tandem.loadtest.__main__ import main
from tandem.loadtest.arrivals import ArrivalPattern, ClosedLoop, OpenLoop
from tandem.loadtest.metrics import summarize
from tandem.loadtest.plots import LATENCY_CDF_SIZE_PX, THROUGHPUT_SIZE_PX
from tandem.loadtest.record import ErrorKind, RequestRecord
from tandem.loadtest.report import load_results
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.runner import RunClock, run_load
from tandem.loadtest.workloads import load_workload
from tests.unit.test_loadtest_plots import png_size

WORKLOADS = Path(__file__).resolve().parents[2] / "loadtest" / "tandem" / "loadtest" / "workloads"
REQUESTS = tuple(WorkloadRequest(f"req-{i}", (1, 2), 2) for i in range(6))


class FakeSender:
    """Answers every request after `service_s`, tracking how many are in flight."""

    def __init__(self, clock: RunClock, service_s: float) -> None:
        self.clock, self.service_s = clock, service_s
        self.in_flight = self.max_in_flight = 0

    async def send(self, request: WorkloadRequest) -> RequestRecord:
        start_s = self.clock()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.service_s)
        self.in_flight -= 1
        end_s = self.clock()
        return RequestRecord(request.request_id, start_s, end_s, (end_s,), request.prompt_len, 1)


def test_open_loop_sends_on_schedule() -> None:
    clock = RunClock()
    sender = FakeSender(clock, service_s=0.5)
    shape = OpenLoop(20.0, ArrivalPattern.CONSTANT)
    result = asyncio.run(run_load(sender, REQUESTS, shape, seed=0, clock=clock))
    assert [r.request_id for r in result.records] == [r.request_id for r in REQUESTS]
    for record, at_s in zip(result.records, shape.send_times_s(6, seed=0)):
        assert at_s <= record.start_s < at_s + 0.05
    assert sender.max_in_flight == 6  # open loop: slow answers never delay the next send
    assert result.duration_s == max(r.end_s for r in result.records)


def test_closed_loop_keeps_concurrency_in_flight() -> None:
    clock = RunClock()
    sender = FakeSender(clock, service_s=0.02)
    done: list[str] = []
    result = asyncio.run(
        run_load(sender, REQUESTS, ClosedLoop(2), seed=0, clock=clock, on_done=lambda r: done.append(r.request_id))
    )
    assert sender.max_in_flight == 2
    assert [r.request_id for r in result.records] == [r.request_id for r in REQUESTS]
    assert sorted(done) == sorted(r.request_id for r in REQUESTS)


def fake_openai_app() -> FastAPI:
    """Streams `max_tokens` one-token chunks; a prompt starting with token 0 gets a 400."""
    app = FastAPI()

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        if body["prompt"][0] == 0:
            return JSONResponse({"error": {"message": "bad prompt"}}, status_code=400)

        async def events() -> AsyncIterator[bytes]:
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.001)
                yield (
                    b"data: "
                    + json.dumps({"choices": [{"index": 0, "text": "x", "token_ids": [i]}]}).encode()
                    + b"\n\n"
                )
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake_openai_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_cli_run_writes_results_and_summary(fake_server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    workload = tmp_path / "w.yaml"
    workload.write_text("kind: random\nvocab_size: 3\ninput_len: {min: 1, max: 3}\noutput_len: {min: 2, max: 4}\n")
    out = tmp_path / "run"
    status = main(
        [
            "run",
            "--base-url",
            fake_server,
            "--model",
            "fake",
            "--workload",
            str(workload),
            "--num-requests",
            "12",
            "--concurrency",
            "3",
            "--seed",
            "1",
            "--slo",
            "e2e=10000",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    saved = load_results(out / "results.json")
    requests = load_workload(workload).generate(12, 1)
    expected_errors = [r.prompt_token_ids[0] == 0 for r in requests]
    assert [r.request_id for r in saved.records] == [r.request_id for r in requests]
    assert [r.error is ErrorKind.HTTP_4XX for r in saved.records] == expected_errors
    assert 0 < sum(expected_errors) < 12  # the seed gives a mix, so both paths are checked
    for record, request in zip(saved.records, requests):
        if record.ok:
            assert (record.output_tokens, len(record.token_times_s), record.prompt_tokens) == (
                request.max_tokens,
                request.max_tokens,
                request.prompt_len,
            )
    assert (saved.info.load, saved.info.slo, saved.info.num_requests) == ("concurrency 3", "e2e=10000", 12)
    summary = summarize(saved.records, saved.duration_s)
    assert summary.num_completed == 12 - sum(expected_errors)
    stored = json.loads((out / "results.json").read_text())["summary"]
    assert stored["num_good"] == summary.num_completed
    markdown = (out / "summary.md").read_text()
    assert f"| requests completed | {summary.num_completed} / 12 |" in markdown
    assert f"| http_4xx | {sum(expected_errors)} |" in markdown
    assert markdown in capsys.readouterr().out
    assert png_size(out / "latency_cdf.png") == LATENCY_CDF_SIZE_PX
    assert png_size(out / "throughput.png") == THROUGHPUT_SIZE_PX
    assert main(["summarize", str(out / "results.json"), "--slo", "ttft=0.000001"]) == 0
    assert "| goodput (SLO ttft=1e-06) | 0 requests, 0.0%" in capsys.readouterr().out


def test_cli_concurrency_sweep_writes_one_run_per_level(
    fake_server: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    workload = tmp_path / "w.yaml"
    workload.write_text("kind: random\nvocab_size: 3\ninput_len: 2\noutput_len: {min: 2, max: 4}\n")
    out = tmp_path / "sweep"
    status = main(
        [
            "run",
            "--base-url",
            fake_server,
            "--model",
            "fake",
            "--workload",
            str(workload),
            "--num-requests",
            "8",
            "--concurrency",
            "1,4",
            "--seed",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert status == 0
    requests = load_workload(workload).generate(8, 2)
    runs = {level: load_results(out / f"c{level}" / "results.json") for level in (1, 4)}
    for level, saved in runs.items():
        assert (saved.info.load, saved.info.concurrency, saved.info.seed) == (f"concurrency {level}", level, 2)
        assert [r.request_id for r in saved.records] == [r.request_id for r in requests]  # same workload
        assert (out / f"c{level}" / "summary.md").read_text().startswith("# Load test summary\n")
        assert not (out / f"c{level}" / "latency_cdf.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["c1", "c4", "latency_cdf.png", "summary.md", "throughput.png"]
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# Concurrency sweep\n\n| metric | concurrency 1 | concurrency 4 |\n|---|---|---|\n")
    okay = [f"{runs[level].summary().num_completed} / {runs[level].summary().num_errors}" for level in (1, 4)]
    assert f"| requests in flight | 1.00 | 4.00 |\n| requests ok / errors | {okay[0]} | {okay[1]} |\n" in markdown
    assert capsys.readouterr().out.endswith(markdown + "\n")
    assert png_size(out / "latency_cdf.png") == LATENCY_CDF_SIZE_PX
    assert png_size(out / "throughput.png") == THROUGHPUT_SIZE_PX


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = [
        "run",
        "--base-url",
        "http://127.0.0.1:9",
        "--model",
        "m",
        "--workload",
        str(WORKLOADS / "random.yaml"),
        "--out",
        str(tmp_path),
    ]
    assert main(common + ["--num-requests", "1", "--rate", "1", "--slo", "ttft"]) == 2
    assert "expected key=milliseconds" in capsys.readouterr().err
    assert main(common + ["--num-requests", "0", "--rate", "1"]) == 2
    assert main(common + ["--num-requests", "1", "--rate", "-1"]) == 2
    assert "positive number of requests per second" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--num-requests", "1", "--rate", "1", "--concurrency", "2"])
