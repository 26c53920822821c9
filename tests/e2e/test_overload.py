"""Overload control at the gateway (issue 15, deliverable 2), on a 1 prefill + 1 decode cluster.

The gateway's capacity is made a known number, `--max-inflight 4`, and both workers are frozen
(SIGSTOP) while a burst arrives, so nothing admitted can finish during it: the outcome counts
are exact. Then an open-loop phase with the workers running: every request is answered (200, or
503 with Retry-After) before its deadline, and memory returns to its baseline. Priority: a table
of arrivals, priorities and outcomes. Every test ends with the pools drained and nothing left
admitted at the gateway."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster, gateway_metric
from tests.integration.workers import wait_until

CAPACITY = 4
DEADLINE_S = 60.0  # every client's own timeout: no request may take longer
REFUSAL_S = 5.0  # a refusal is immediate: well under this even on a loaded machine
RSS_MARGIN_MIB = 32.0
HEARTBEAT_TTL_S = 60.0  # the frozen workers stay registered


@dataclass
class Outcome:
    status: int
    retry_after: str | None
    body: dict
    elapsed_s: float


def call(url: str, body: dict, key: str | None = None) -> Outcome:
    u = urlparse(url)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    start = time.monotonic()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=DEADLINE_S)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return Outcome(resp.status, resp.headers["Retry-After"], json.loads(raw), time.monotonic() - start)
    finally:
        conn.close()


class Arrival(threading.Thread):
    """One request sent on its own thread (open loop: the sender does not wait for it)."""

    def __init__(self, url: str, body: dict, key: str | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.key = url, body, key
        self.outcome: Outcome | None = None

    def run(self) -> None:
        self.outcome = call(self.url, self.body, self.key)

    def result(self) -> Outcome:
        self.join(DEADLINE_S + 5)
        assert self.outcome is not None, "a client hung past its deadline"
        return self.outcome


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="module")
def small(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    trace_file = tmp_path_factory.mktemp("overload") / "spans.jsonl"
    c = Cluster.start(tiny_model_dir, trace_file, num_prefill=1, num_decode=1, heartbeat_ttl_s=HEARTBEAT_TTL_S)
    try:
        yield c
    finally:
        c.stop()


class Frozen:
    """Both pools frozen (SIGSTOP) inside the block, resumed on the way out."""

    def __init__(self, cluster: Cluster) -> None:
        self.pids = [w.pid for w in cluster.workers]

    def __enter__(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)


OPEN_LOOP_TOKENS = 64  # per request of the open loop (phase 2)


def body(model: str, **extra: object) -> dict:
    return {"model": model, "prompt": list(range(5, 37)), "max_tokens": 8, "temperature": 0, **extra}


def end_clean(cluster: Cluster, gateway: ChildProcess) -> None:
    assert wait_until(lambda: gateway_metric(gateway, "tandem_admitted_requests") == 0, 10)
    cluster.assert_drained(timeout_s=20.0)


def test_overload_burst_exact_counts_no_hang_memory_baseline(small: Cluster) -> None:
    model = small.model_dir.name
    g = small.gateway("--max-inflight", str(CAPACITY), "--ttft-budget-s", "600")
    try:
        # Phase 1: a burst of 4x capacity while nothing can finish: exactly CAPACITY admitted.
        with Frozen(small):
            burst = [Arrival(g.address, body(model)) for _ in range(4 * CAPACITY)]
            for a in burst:
                a.start()
            refused = 3 * CAPACITY
            assert wait_until(lambda: sum(a.outcome is not None for a in burst) == refused, 30)
            assert gateway_metric(g, "tandem_admitted_requests") == CAPACITY
        outcomes = [a.result() for a in burst]
        assert sorted(o.status for o in outcomes) == [200] * CAPACITY + [503] * refused
        for o in outcomes:
            assert o.elapsed_s < DEADLINE_S
            if o.status == 503:
                assert o.retry_after == "1"  # nothing finished yet: no drain rate measured
                assert o.elapsed_s < REFUSAL_S
                assert o.body["error"]["type"] == "service_unavailable"
                assert o.body["error"]["message"] == (
                    "The server is overloaded: 4 requests in flight, and priority 0 is admitted below 4."
                )
            else:
                assert o.body["usage"]["completion_tokens"] == 8
        assert gateway_metric(g, "tandem_admission_refusals_total", reason="inflight") == refused
        assert gateway_metric(g, "tandem_requests_total", endpoint="/v1/completions", status="503") == refused
        assert gateway_metric(g, "tandem_requests_total", endpoint="/v1/completions", status="200") == CAPACITY
        end_clean(small, g)

        # Phase 2: open loop at about 100 requests/s, workers running; warm-up, then measured.
        # 64 tokens each: a request holds its slot for several times the 10 ms between
        # arrivals, so the open loop stays over 4 in flight however fast the stack serves.
        def open_loop(count: int) -> list[Outcome]:
            arrivals = [Arrival(g.address, body(model, max_tokens=OPEN_LOOP_TOKENS)) for _ in range(count)]
            for a in arrivals:
                a.start()
                time.sleep(0.01)
            return [a.result() for a in arrivals]

        open_loop(40)
        end_clean(small, g)
        pids = {"gateway": g.pid, **{w.name: w.pid for w in small.workers}}
        baseline = {name: rss_mib(pid) for name, pid in pids.items()}
        outcomes = open_loop(200)
        statuses = [o.status for o in outcomes]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 1  # 100/s is far over 4 in flight on this model
        for o in outcomes:
            assert o.elapsed_s < DEADLINE_S
            if o.status == 503:
                assert o.elapsed_s < REFUSAL_S
                assert 1 <= int(o.retry_after or "0") <= 60
            else:
                assert o.body["usage"]["completion_tokens"] == OPEN_LOOP_TOKENS
        end_clean(small, g)
        after = {name: rss_mib(pid) for name, pid in pids.items()}
        grown = {name: round(after[name] - baseline[name], 1) for name in pids}
        assert all(mib <= RSS_MARGIN_MIB for mib in grown.values()), grown
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


# (key, body priority or None, effective priority, expected status). Capacity 4, step 0.25:
# priority p is admitted while fewer than max(1, floor(4 * (1 - 0.25 p))) are in flight.
PRIORITY_TABLE = [
    ("sk-batch", None, 2, 200),  # 0 in flight < 2
    ("sk-chat", 2, 2, 200),  # 1 < 2
    ("sk-batch", None, 2, 503),  # 2 in flight: priority 2 refused first
    ("sk-chat", 1, 1, 200),  # 2 < 3
    ("sk-batch", 1, 1, 503),  # 3 in flight: the body's priority overrides the key's default
    ("sk-chat", None, 0, 200),  # 3 < 4
    ("sk-chat", -1, -1, 503),  # 4 in flight: the bound itself
    ("sk-batch", 5, 5, 503),
]


def test_priority_lower_refused_first(small: Cluster) -> None:
    model = small.model_dir.name
    g = small.gateway(
        "--max-inflight",
        str(CAPACITY),
        "--ttft-budget-s",
        "600",
        "--api-key",
        "sk-chat",
        "--api-key",
        "sk-batch",
        "--key-priority",
        "sk-batch=2",
    )
    try:
        bad = call(g.address, body(model, priority="high"), "sk-chat")
        assert (bad.status, bad.body["error"]["param"]) == (400, "priority")
        arrivals: list[Arrival] = []
        with Frozen(small):
            for key, priority, _, expected in PRIORITY_TABLE:
                extra = {} if priority is None else {"priority": priority}
                a = Arrival(g.address, body(model, **extra), key)
                a.start()
                arrivals.append(a)
                admitted = sum(e == 200 for *_, e in PRIORITY_TABLE[: len(arrivals)])
                if expected == 503:
                    assert a.result().status == 503
                else:  # its admission is counted before the next one arrives
                    assert wait_until(lambda n=admitted: gateway_metric(g, "tandem_admitted_requests") == n, 30)
        table = [(key, eff, a.result().status) for (key, _, eff, _), a in zip(PRIORITY_TABLE, arrivals)]
        assert table == [(key, eff, expected) for key, _, eff, expected in PRIORITY_TABLE]
        end_clean(small, g)
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)
