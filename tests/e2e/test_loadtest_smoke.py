"""The load generator against a real cluster, as a user runs it: `tandem up` (1 prefill, 1 decode,
every request disaggregated), then `python -m tandem.loadtest run` with a concurrency sweep, the same
through `tandem bench serve`, and `python -m tandem.loadtest compare` on the saved runs. Every request
must succeed with exactly the requested number of output tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.loadtest.workloads import load_workload
from tests.e2e.test_up import REPO_ROOT, UpProcess, started, stop_and_check_no_orphans  # noqa: F401 (fixture)
from tests.unit.test_loadtest_plots import PNG_SIGNATURE

pytestmark = pytest.mark.slow

WORKLOAD = REPO_ROOT / "loadtest" / "tandem" / "loadtest" / "workloads" / "smoke.yaml"
NUM_REQUESTS = 12
SEED = 0


def run_cli(up: UpProcess, *argv: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO_ROOT, env=up.env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (result.stdout, result.stderr, up.stderr_tail())
    return result


def check_run(run_dir: Path, load: str) -> None:
    """results.json holds every request, all successful, one token event per output token."""
    data = json.loads((run_dir / "results.json").read_text())
    expected = load_workload(WORKLOAD).generate(NUM_REQUESTS, SEED)
    assert (data["run"]["load"], data["summary"]["num_errors"]) == (load, 0)
    records = data["requests"]
    assert [r["request_id"] for r in records] == [r.request_id for r in expected]
    for record, request in zip(records, expected):
        assert (record["error"], record["http_status"]) == (None, 200)
        assert record["token_times_s"] and record["start_s"] < record["token_times_s"][0]  # has a TTFT
        # ignore_eos: exactly max_tokens come back (usage). The decode worker coalesces the tokens
        # that are ready into one message when the client is slower than its step loop
        # (services/tandem/decode/stream.py), so an event may carry several tokens: never fewer
        # events than 1, never more than tokens.
        assert record["output_tokens"] == request.max_tokens
        assert 1 <= len(record["token_times_s"]) <= record["output_tokens"]
        assert record["prompt_tokens"] == request.prompt_len
    summary = (run_dir / "summary.md").read_text()
    assert summary.startswith("# Load test summary\n")
    assert f"| requests completed | {NUM_REQUESTS} / {NUM_REQUESTS} |" in summary
    assert "| latency (ms) | count | mean | p50 | p90 | p99 |" in summary


def check_plots(out: Path) -> None:
    for name in ("latency_cdf.png", "throughput.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE


def test_loadtest_sweep_and_compare_against_a_real_cluster(
    tmp_path: Path, tiny_model_dir: Path, started: list[UpProcess]
) -> None:
    up = UpProcess.start(tmp_path, tiny_model_dir, "--prefill", "1", "--decode", "1", "--local-prefill-max-tokens", "0")
    started.append(up)  # the fixture kills it and any orphan if the test fails before the stop below
    common = [
        "--base-url",
        up.state["endpoint"],
        "--model",
        up.banner_value("model"),
        "--workload",
        str(WORKLOAD),
        "--num-requests",
        str(NUM_REQUESTS),
        "--seed",
        str(SEED),
        "--no-progress",
        "--slo",
        "ttft=10000,tpot=10000",
    ]

    sweep = tmp_path / "sweep"
    run_cli(up, "tandem.loadtest", "run", *common, "--concurrency", "1,4", "--out", str(sweep))
    check_run(sweep / "c1", "concurrency 1")
    check_run(sweep / "c4", "concurrency 4")
    check_plots(sweep)
    assert (
        (sweep / "summary.md")
        .read_text()
        .startswith("# Concurrency sweep\n\n| metric | concurrency 1 | concurrency 4 |\n")
    )

    alias = tmp_path / "alias"
    run_cli(up, "tandem", "bench", "serve", *common, "--concurrency", "2", "--out", str(alias))
    check_run(alias, "concurrency 2")
    check_plots(alias)

    compared = tmp_path / "cmp"
    printed = run_cli(
        up,
        "tandem.loadtest",
        "compare",
        str(sweep / "c1" / "results.json"),
        str(sweep / "c4" / "results.json"),
        "--out",
        str(compared),
    ).stdout
    table = (compared / "compare.md").read_text()
    assert printed == table + "\n"
    assert "| metric | concurrency 1 | concurrency 4 |\n|---|---|---|\n" in table
    assert f"| requests ok / errors | {NUM_REQUESTS} / 0 | {NUM_REQUESTS} / 0 |\n" in table
    assert "| goodput (% of requests) | 100.0% | 100.0% |\n" in table
    check_plots(compared)

    stop_and_check_no_orphans(up)
