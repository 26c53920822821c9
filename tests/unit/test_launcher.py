"""The launcher's pieces without a model: config validation, argv, child processes stopped by
pid (SIGTERM, and SIGKILL for a child that ignores it), parent-death signals, the state file,
and the status tables."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.common.options import parse
from tandem.common.plane_auth import TOKEN_ENV, ClusterToken, PlaneAuth
from tandem.common.tracing import TracingConfig
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.launcher import ChildProcess, ChildStartError, LocalClusterConfig, StartCancelled
from tandem.launcher.config import ChildSecrets, gateway_template, worker_template
from tandem.launcher.state_file import ChildSummary, UpState, read_state, remove_state, write_state
from tandem.launcher.status import render, run_status, summarize

READY = 'import json, sys; print(json.dumps({"event": "ready", "address": "127.0.0.1:1"}), flush=True); '
REPO_ROOT = Path(__file__).resolve().parents[2]


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a container's init may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def python_child(code: str, sink: io.StringIO, name: str = "dummy") -> ChildProcess:
    return ChildProcess.spawn(name, [sys.executable, "-c", code], sink=sink)


# ---- LocalClusterConfig ------------------------------------------------------------------


def up(*flags: str) -> LocalClusterConfig:
    """The config `tandem up FLAGS` runs (without TANDEM_API_KEYS)."""
    config: LocalClusterConfig = parse(LocalClusterConfig, list(flags))
    return config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_prefill=-1), "num_prefill must be an int >= 0"),
        (dict(num_decode=0), "num_decode must be an int >= 1"),
        (dict(num_decode=True), "num_decode must be an int >= 1"),
        (dict(num_prefill=40, num_decode=40), "at most 64 workers"),
        (dict(model_dir=Path("/nonexistent/model")), "is not a directory"),
        (dict(redis_url="localhost:6379"), "redis_url must start with"),
        (
            dict(worker=replace(worker_template(), cluster="a")),
            "the workers' cluster ('a') must equal the gateway's cluster ('default')",
        ),
        (
            dict(gateway=replace(gateway_template(), max_model_len=64)),
            "the workers' engine.max_model_len (None) must equal the gateway's max_model_len (64)",
        ),
        (
            dict(worker=replace(worker_template(), engine=replace(worker_template().engine, block_size=32))),
            "the workers' engine.block_size (32) must equal the gateway's scheduler.block_size (16)",
        ),
        (dict(gateway=replace(gateway_template(), api_keys=("ok", "has space"))), "api keys must not"),
        (dict(gateway=replace(gateway_template(), api_keys=("a,b",))), "api keys must not"),
        (dict(ready_timeout_s=0), "ready_timeout_s must be > 0"),
    ],
)
def test_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        LocalClusterConfig(**kwargs)


def test_the_worker_and_gateway_configs_reject_a_cluster_name_redis_keys_cannot_hold() -> None:
    message = "cluster must be 1-128 chars of [A-Za-z0-9_.-], got 'a*b'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        replace(worker_template(), cluster="a*b")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        replace(gateway_template(), cluster="a*b")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "port must be in [0, 65535], got 70000"),
        (["--host", "example.com"], "host must be an IP address or 'localhost', got 'example.com'"),
        (["--drain-timeout-s", "-1"], "drain_timeout_s must be > 0, got -1.0"),
        (["--local-prefill-max-tokens", "-1"], "scheduler local_prefill_max_tokens must be an int >= 0"),
        (["--kv-cache-mib", "0"], "kv_cache_bytes must be a positive integer"),
        (["--max-model-len", "-5"], "max_model_len must be a positive integer"),
        (["--policy", "bad policy"], "invalid choice: 'bad policy'"),
        (["--kv-transport", "nccl"], "invalid choice: 'nccl'"),
        (["--otel-exporter", "otlp"], "the otlp tracing exporter needs an endpoint (--otel-endpoint)"),
    ],
)
def test_up_flags_reject(flags: list[str], message: str) -> None:
    with pytest.raises((ValueError, argparse.ArgumentError), match=re.escape(message)):
        up(*flags)


def test_config_defaults_and_colocated() -> None:
    config = LocalClusterConfig()
    assert (config.num_prefill, config.num_decode, config.gateway.host, config.gateway.port) == (
        1,
        1,
        "127.0.0.1",
        8000,
    )
    assert (config.worker, config.gateway, config.cluster, config.drain_timeout_s) == (
        worker_template(),
        gateway_template(),
        "default",
        30.0,
    )
    assert up() == config
    colocated = LocalClusterConfig(num_prefill=0, num_decode=2)
    assert colocated.worker_ids() == [(WorkerRole.DECODE, "decode-0"), (WorkerRole.DECODE, "decode-1")]


@pytest.mark.parametrize(
    "num_prefill, num_decode, cpus, threads",
    [
        (1, 1, 2, 1),
        (2, 2, 2, 1),
        (1, 1, 8, 4),
        (1, 2, 8, 2),
        (0, 1, 4, 4),
        (1, 1, None, 1),
    ],
)
def test_threads_divide_the_cores(num_prefill: int, num_decode: int, cpus: int | None, threads: int) -> None:
    assert LocalClusterConfig(num_prefill=num_prefill, num_decode=num_decode).threads_per_worker(cpus) == threads


def test_up_flags_fill_both_templates(tmp_path: Path) -> None:
    config = up(
        *("--port", "0", "--cluster", "c1", "--policy", "round_robin", "--kv-cache-mib", "8"),
        *("--max-model-len", "512", "--kv-transport", "torch", "--api-key", "k2", "--api-key", "k1"),
        *("--otel-exporter", "file", "--otel-file", str(tmp_path / "spans.jsonl"), "--max-num-seqs", "4"),
    )
    tracing = TracingConfig(exporter="file", file_path=tmp_path / "spans.jsonl")
    worker, gateway = worker_template(), gateway_template()
    assert config.worker == replace(
        worker,
        cluster="c1",
        engine=replace(worker.engine, kv_cache_bytes=8 * 1024 * 1024, max_model_len=512, max_num_seqs=4),
        kv_transfer=replace(worker.kv_transfer, transport="torch"),
        tracing=tracing,
    )
    assert config.gateway == replace(
        gateway,
        port=0,
        cluster="c1",
        max_model_len=512,
        api_keys=("k2", "k1"),
        scheduler=replace(gateway.scheduler, policy="round_robin"),
        tracing=tracing,
    )
    assert config.api_keys == ("k2", "k1")  # as given: the banner's curl example uses the first


def test_children_argv_parse_back_to_their_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The children's command lines hold no secret: the Redis URL (with its password) and the
    cluster token come from their environment (`ChildSecrets`)."""
    from tandem.cli import build_parser
    from tandem.cli.serve import gateway_config, worker_config

    monkeypatch.delenv(TOKEN_ENV)
    config = up("--port", "0", "--cluster", "c1", "--kv-cache-mib", "8", "--api-key", "k1", "--api-key", "k2")
    redis_url = "redis://:the-password@127.0.0.1:1/0"
    secrets = ChildSecrets(redis_url, ClusterToken("the-cluster-token-0000"))
    assert secrets.environ({"PATH": "/bin", TOKEN_ENV: "old"}) == {
        "PATH": "/bin",
        "TANDEM_REDIS_URL": redis_url,
        TOKEN_ENV: "the-cluster-token-0000",
    }
    assert "the-password" not in repr(secrets) and "the-cluster-token" not in repr(secrets)
    for name, value in secrets.environ({}).items():
        monkeypatch.setenv(name, value)
    plane = PlaneAuth(token=secrets.token)
    worker = config.worker_argv(WorkerRole.PREFILL, "prefill-0", tmp_path, redis_url, 3)
    assert worker == [
        *(sys.executable, "-m", "tandem", "prefill", "--worker-id", "prefill-0", "--model", str(tmp_path)),
        *("--metrics-port", "0", "--cluster", "c1", "--kv-cache-mib", "8"),
        *("--num-threads", "3"),
    ]
    expected = config.worker_config(WorkerRole.PREFILL, "prefill-0", tmp_path, redis_url, 3)
    assert worker_config(build_parser().parse_args(worker[3:])) == replace(expected, plane=plane)
    assert (expected.host, expected.port, expected.metrics_port, expected.engine.num_threads) == ("127.0.0.1", 0, 0, 3)

    gateway = config.gateway_argv(tmp_path, redis_url)
    assert gateway == [
        *(sys.executable, "-m", "tandem", "gateway", "--model", str(tmp_path)),
        *("--port", "0", "--cluster", "c1"),
    ]
    env = config.gateway_env({"TANDEM_API_KEYS": "old", "PATH": "/bin"})
    assert env == {"PATH": "/bin", "TANDEM_API_KEYS": "k1,k2"}
    args = build_parser().parse_args(gateway[3:])
    assert gateway_config(args) == replace(config.gateway_config(tmp_path, redis_url), api_keys=(), plane=plane)
    assert "TANDEM_API_KEYS" not in LocalClusterConfig().gateway_env({"TANDEM_API_KEYS": "old"})


# ---- ChildProcess ------------------------------------------------------------------------


def test_child_ready_line_output_and_sigterm() -> None:
    sink = io.StringIO()
    child = python_child(
        READY + "print('to stderr', file=sys.stderr, flush=True); print('more stdout', flush=True); "
        "import time; time.sleep(60)",
        sink,
    )
    try:
        assert child.wait_ready(timeout_s=20) == {"event": "ready", "address": "127.0.0.1:1"}
        deadline = time.monotonic() + 5
        while "more stdout" not in child.output_tail() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        started = time.monotonic()
        code = child.stop(timeout_s=5)
    assert code == -signal.SIGTERM and time.monotonic() - started < 3
    assert not pid_alive(child.pid) and not child.is_running
    assert "[dummy] to stderr\n" in sink.getvalue() and "[dummy] more stdout\n" in sink.getvalue()
    assert "ready" not in sink.getvalue()  # the ready line is consumed, not forwarded
    assert child.stop(timeout_s=5) == code  # idempotent


def test_child_that_ignores_sigterm_is_killed() -> None:
    sink = io.StringIO()
    child = python_child(
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + READY + "import time; time.sleep(60)", sink
    )
    child.wait_ready(timeout_s=20)
    started = time.monotonic()
    assert child.stop(timeout_s=0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 3
    assert not pid_alive(child.pid)


def test_child_that_exits_early_reports_its_output() -> None:
    child = python_child("import sys; print('model not found: /x', file=sys.stderr); sys.exit(3)", io.StringIO())
    with pytest.raises(ChildStartError, match=r"(?s)exited with code 3 before it was ready.*model not found: /x"):
        child.wait_ready(timeout_s=20)
    assert child.stop(timeout_s=1) == 3


def test_child_ready_timeout_and_cancel() -> None:
    child = python_child("import time; print('loading', flush=True); time.sleep(60)", io.StringIO())
    try:
        with pytest.raises(ChildStartError, match=r"(?s)dummy \(pid \d+\) not ready after 0.3 s.*loading"):
            child.wait_ready(timeout_s=0.3)
        with pytest.raises(StartCancelled):
            child.wait_ready(timeout_s=20, cancelled=lambda: True)
        assert child.is_running  # the caller decides: it is stopped below
    finally:
        child.stop(timeout_s=5)
    assert not pid_alive(child.pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_a_sigkilled_parent() -> None:
    """A parent that spawned a ChildProcess is SIGKILLed: the kernel sends its child SIGTERM."""
    parent_code = textwrap.dedent(f"""
        import sys, time
        from tandem.launcher.processes import ChildProcess
        child = ChildProcess.spawn("grandchild", [sys.executable, "-c", {READY + "import time; time.sleep(60)"!r}])
        child.wait_ready(20)
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(parent.stdout.readline())  # type: ignore[union-attr]
        assert pid_alive(grandchild)
    finally:
        parent.kill()
        parent.wait(5)
    assert wait_gone(grandchild, timeout_s=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_death_signal_is_set_without_a_preexec_fn(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `preexec_fn` (it forces a fork that runs grpcio's fork handlers: grpc/grpc#43055):
    the exec wrapper sets the signal, and the child keeps the pid that `stop()` addresses."""
    seen: list[dict] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen:
        seen.append(kwargs)
        return real_popen(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", popen)
    code = (
        "import ctypes, json, os\n"
        "sig = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)\n"  # PR_GET_PDEATHSIG
        "print(json.dumps({'event': 'ready', 'address': 'x', 'sig': sig.value, 'pid': os.getpid()}), flush=True)\n"
    )
    child = ChildProcess.start("pdeathsig", [sys.executable, "-c", code], 20.0)
    try:
        ready = child.wait_ready(1)
        assert (ready["sig"], ready["pid"]) == (int(signal.SIGTERM), child.pid)
        assert [kwargs.get("preexec_fn") for kwargs in seen] == [None]
    finally:
        child.stop(timeout_s=5)


def test_a_missing_program_fails_at_spawn() -> None:
    with pytest.raises(FileNotFoundError, match="no such program: '/nonexistent/tandem-x'"):
        ChildProcess.spawn("missing", ["/nonexistent/tandem-x"])


# ---- state file and status ---------------------------------------------------------------


def test_state_file_round_trip_and_ownership(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "up.json"
    assert read_state(path) is None
    state = UpState(
        "redis://127.0.0.1:1/0",
        "default",
        "http://127.0.0.1:8000",
        pid=123,
        children=(ChildSummary("decode-0", 456, "127.0.0.1:5000", 9100),),
    )
    write_state(path, state)
    assert read_state(path) == state
    assert json.loads(path.read_text())["children"][0] == {
        "name": "decode-0",
        "pid": 456,
        "address": "127.0.0.1:5000",
        "metrics_port": 9100,
    }
    remove_state(path, pid=999)  # someone else's file: kept
    assert path.exists()
    remove_state(path, pid=123)
    assert not path.exists()
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="malformed"):
        read_state(path)


def _info(worker_id: str, role: WorkerRole) -> WorkerInfo:
    return WorkerInfo(worker_id, role, f"127.0.0.1:{5000 + len(worker_id)}", "ab12", 100, "0.1.0")


def test_status_rows_pools_and_table() -> None:
    workers = [
        dataclasses.replace(_info("decode-1", WorkerRole.DECODE), kv_cache_dtype="fp8", capacity_blocks=200),
        _info("prefill-0", WorkerRole.PREFILL),
        _info("decode-0", WorkerRole.DECODE),
    ]
    loads = {
        "decode-0": WorkerLoad(2, 3, 0, 25, 100, 1.0),
        "decode-1": WorkerLoad(1, 1, 16, 75, 300, 1.0, spec_draft_tokens=40, spec_accepted_tokens=30),
        "prefill-0": None,
    }
    status = summarize("c1", workers, loads)
    assert [(w.worker_id, w.role, w.waiting, w.kv_usage_perc, w.spec_acceptance_perc) for w in status.workers] == [
        ("prefill-0", "prefill", None, None, None),
        ("decode-0", "decode", 2, 25.0, None),  # no draft yet: no rate
        ("decode-1", "decode", 1, 25.0, 75.0),
    ]
    assert [(p.role, p.workers, p.waiting, p.running, p.kv_usage_perc) for p in status.pools] == [
        ("prefill", 1, 0, 0, 0.0),
        ("decode", 2, 3, 4, 25.0),
    ]
    lines = render(status).splitlines()
    assert lines[0] == "cluster c1: 3 live worker(s)"
    header = ["WORKER", "ROLE", "ADDRESS", "WAITING", "RUNNING", "QUEUED_PREFILL_TOKENS", "KV_USE"]
    assert lines[2].split() == [*header, "KV_DTYPE", "KV_BLOCKS", "SPEC_ACCEPT", "STATUS"]
    # no gateway; the KV dtype of a worker that published none is "-"; no draft yet: no acceptance
    assert lines[3].split() == ["prefill-0", "prefill", "127.0.0.1:5009", "-", "-", "-", "-", "-", "100", "-", "-"]
    assert lines[4].split()[-3:] == ["100", "-", "-"]
    assert lines[5].split() == [
        "decode-1",
        "decode",
        "127.0.0.1:5008",
        "1",
        "1",
        "16",
        "25.0%",
        "fp8",
        "200",
        "75.0%",
        "-",
    ]
    assert lines[7].split() == ["POOL", "WORKERS", "WAITING", "RUNNING", "KV_USE"]
    assert lines[8:] == [
        "prefill  1        0        0        0.0%",
        "decode   2        3        4        25.0%",
        "",
        "no live gateway: routing mode unknown",
    ]
    empty = render(summarize("c1", [], {}))
    assert "no live workers" in empty


def test_status_reports_unreachable_redis(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert run_status(f"redis://127.0.0.1:{port}/0", "default") == 1
    assert f"cannot read cluster state from Redis at redis://127.0.0.1:{port}/0" in capsys.readouterr().err


def test_status_cli_without_state_file_names_the_flag(tmp_path: Path) -> None:
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "status"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "--redis URL" in result.stderr and str(tmp_path / "up.json") in result.stderr


def test_redis_child_serves_status_and_stops_by_pid(capsys: pytest.CaptureFixture[str]) -> None:
    import redis

    from tandem.common.cluster_state import ClusterState
    from tandem.launcher.redis_child import RedisChild

    server = RedisChild.start(ready_timeout_s=20, sink=io.StringIO())
    try:
        state = ClusterState(redis.Redis.from_url(server.url, socket_timeout=2.0), "c1")
        state.register(_info("decode-0", WorkerRole.DECODE), ttl_s=30)
        state.publish_load("decode-0", WorkerLoad(0, 1, 0, 10, 40, time.time()), ttl_s=30)
        assert run_status(server.url, "c1", as_json=True) == 0
        report = json.loads(capsys.readouterr().out)
        assert [(w["worker_id"], w["running"], w["kv_usage_perc"]) for w in report["workers"]] == [
            ("decode-0", 1, 25.0)
        ]
        assert [(p["role"], p["workers"]) for p in report["pools"]] == [("prefill", 0), ("decode", 1)]
    finally:
        assert server.stop() == 0
    assert not pid_alive(server.child.pid)
    assert server.stop() == 0  # idempotent


def test_wait_all_ready_fails_fast_when_one_child_exits() -> None:
    from tandem.launcher.ready import wait_all_ready

    slow = python_child("import time; time.sleep(60)", io.StringIO(), name="slow")
    broken = python_child("import sys; print('bad flag', file=sys.stderr); sys.exit(2)", io.StringIO(), name="broken")
    try:
        started = time.monotonic()
        with pytest.raises(ChildStartError, match=r"(?s)broken \(pid \d+\) exited with code 2.*bad flag"):
            wait_all_ready([slow, broken], timeout_s=30)
        assert time.monotonic() - started < 10
    finally:
        slow.stop(timeout_s=5)
        broken.stop(timeout_s=5)


def test_status_cli_warns_about_a_stale_state_file(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    write_state(tmp_path / "up.json", UpState(f"redis://127.0.0.1:{port}/0", "c1", "http://127.0.0.1:1", dead.pid))
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "status"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and result.stdout == ""
    assert f"the cluster 'c1' named in {tmp_path / 'up.json'} is gone: its `tandem up` (pid {dead.pid})" in (
        result.stderr
    )


def test_curl_example_is_one_pasteable_line() -> None:
    import shlex

    from tandem.launcher.up import curl_example

    line = curl_example("http://127.0.0.1:8000", "tiny-llama-v1", api_key="sk-1")
    argv = shlex.split(line)
    assert argv[:3] == ["curl", "-s", "http://127.0.0.1:8000/v1/chat/completions"]
    assert argv[argv.index("-H", 4) + 1] == "Authorization: Bearer sk-1"
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["model"] == "tiny-llama-v1" and body["messages"][0]["role"] == "user"
    assert "Authorization" not in curl_example("http://127.0.0.1:8000", "m", api_key=None)


def test_served_model_name_falls_back_when_the_gateway_does_not_answer() -> None:
    from tandem.launcher.up import served_model_name

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert served_model_name(f"http://127.0.0.1:{port}", None, fallback="dir-name") == "dir-name"
