"""`tandem up` end to end, as a user runs it: one command brings up Redis, workers and the
gateway; curl gets the same completion as the in-process engine; `tandem status` lists the
workers; SIGTERM stops everything (exit 0, no process left), and so does SIGKILL (the kernel
signals the children: PR_SET_PDEATHSIG)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.workers import metric_sum

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
PROMPT = "Tell me about Tandem."
MAX_TOKENS = 8

pytestmark = pytest.mark.slow


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pids_with_arg(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (to find orphans)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class UpProcess:
    """A running `python -m tandem up` with its own HOME and cache dir."""

    proc: subprocess.Popen
    cache_dir: Path
    cluster: str
    env: dict[str, str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, tmp_path: Path, model_dir: Path, *flags: str, unset: tuple[str, ...] = ()) -> UpProcess:
        """`unset`: environment variables `tandem up` must not see (e.g. the session's token)."""
        cache_dir, home = tmp_path / "cache", tmp_path / "home"
        home.mkdir()
        cluster = f"e2e-{uuid.uuid4().hex[:8]}"  # unique: lets the test find its processes in /proc
        env = {**os.environ, "HOME": str(home), "TANDEM_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
        for name in ("TANDEM_API_KEYS", *unset):
            env.pop(name, None)
        argv = [
            sys.executable,
            "-m",
            "tandem",
            "up",
            "--port",
            str(free_port()),
            "--model",
            str(model_dir),
            "--kv-cache-mib",
            "8",
            "--cluster",
            cluster,
            *flags,
        ]
        # Its own session, like a shell job: its children share its process group, which a
        # test can signal as a terminal's Ctrl-C would.
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        up = cls(proc, cache_dir, cluster, env)
        threading.Thread(target=lambda: up.stdout.extend(proc.stdout), daemon=True).start()
        threading.Thread(target=lambda: up.stderr.extend(proc.stderr), daemon=True).start()
        if (
            not wait_until(
                lambda: (up.state_path.exists() and "Try it:\n" in up.stdout) or proc.poll() is not None,
                START_TIMEOUT_S,
                0.2,
            )
            or proc.poll() is not None
        ):
            up.kill()
            raise AssertionError(f"tandem up did not come up (exit {proc.poll()}):\n{up.stderr_tail()}")
        return up

    @property
    def state_path(self) -> Path:
        return self.cache_dir / "up.json"

    @property
    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def banner_value(self, key: str) -> str:
        return next(line.split(":", 1)[1].strip() for line in self.stdout if line.startswith(f"  {key}:"))

    def stderr_tail(self, lines: int = 60) -> str:
        return "".join(self.stderr[-lines:])

    def tandem(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tandem", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def kill(self) -> None:
        """Test cleanup: SIGKILL `tandem up` if it still runs; its children follow (pdeathsig)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def expected_content(tiny_model_dir: Path) -> str:
    """What the in-process engine answers to the chat prompt, greedy, MAX_TOKENS tokens."""
    from tandem.engine import Engine, EngineConfig, SamplingParams
    from tandem.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]), add_special_tokens=False
    )
    out = Engine(tiny_model_dir, EngineConfig()).generate(
        [prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    )[0]
    return tokenizer.decode(list(out.token_ids), skip_special_tokens=True)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[UpProcess]]:
    """Collects the `tandem up` processes a test starts; kills leftovers and orphans after it."""
    ups: list[UpProcess] = []
    yield ups
    for up in ups:
        up.kill()
        for pid in pids_with_arg(up.cluster):
            os.kill(pid, signal.SIGKILL)
        for child in up.state["children"] if up.state_path.exists() else []:
            if child["name"] == "redis" and pid_alive(child["pid"]):
                os.kill(child["pid"], signal.SIGKILL)


def chat(endpoint: str, model: str) -> tuple[int, dict]:
    """POST a greedy chat completion with the curl binary (http.client if there is no curl)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": MAX_TOKENS}
    )
    curl = shutil.which("curl")
    if curl is None:
        import http.client
        from urllib.parse import urlsplit

        url = urlsplit(endpoint)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    result = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "60",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            "-w",
            "\n%{http_code}",
            f"{endpoint}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    payload, status = result.stdout.rsplit("\n", 1)
    return int(status), json.loads(payload)


def status_rows(up: UpProcess) -> list[list[str]]:
    """The worker rows of `tandem status`'s table (no flags: it finds the cluster in up.json)."""
    result = up.tandem("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("WORKER"))
    end = lines.index("", start)
    return [line.split() for line in lines[start + 1 : end]]


def metric(metrics_port: int, name: str) -> float:
    return metric_sum(f"http://127.0.0.1:{metrics_port}/metrics", name)


def stop_and_check_no_orphans(up: UpProcess, ctrl_c: bool = False) -> None:
    """SIGTERM to `tandem up` (or SIGINT to its whole process group, as Ctrl-C in a terminal
    sends): exit 0 within the bound, every child gone, state file removed."""
    pids = [child["pid"] for child in up.state["children"]]
    assert len(pids) == len(set(pids)) and all(pid_alive(pid) for pid in pids)
    assert all(os.getpgid(pid) == up.proc.pid for pid in pids)  # children share its group
    started = time.monotonic()
    if ctrl_c:
        os.killpg(up.proc.pid, signal.SIGINT)
    else:
        up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(STOP_TIMEOUT_S) == 0, up.stderr_tail()
    assert time.monotonic() - started < STOP_TIMEOUT_S
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert pids_with_arg(up.cluster) == []
    assert not up.state_path.exists()


def test_up_serves_disaggregated_and_stops_cleanly(
    tmp_path: Path, tiny_model_dir: Path, expected_content: str, started: list[UpProcess]
) -> None:
    # Threshold 0: every request goes through the prefill worker and a KV hand-off.
    up = UpProcess.start(tmp_path, tiny_model_dir, "--prefill", "1", "--decode", "1", "--local-prefill-max-tokens", "0")
    started.append(up)
    state = up.state
    endpoint, model = up.banner_value("endpoint"), up.banner_value("model")
    assert state["endpoint"] == endpoint and state["cluster"] == up.cluster and state["pid"] == up.proc.pid
    assert sorted(child["name"] for child in state["children"]) == ["decode-0", "gateway", "prefill-0", "redis"]
    assert model == tiny_model_dir.name

    status, body = chat(endpoint, model)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected_content
    assert body["usage"]["completion_tokens"] <= MAX_TOKENS
    prefill_metrics = next(c["metrics_port"] for c in state["children"] if c["name"] == "prefill-0")
    assert metric(prefill_metrics, "tandem_leases_granted_total") >= 1  # the prompt was prefilled on P

    example = next(line.strip() for line in up.stdout if line.strip().startswith("curl "))
    pasted = subprocess.run(["bash", "-c", example], capture_output=True, text=True, timeout=90)
    assert pasted.returncode == 0 and json.loads(pasted.stdout)["object"] == "chat.completion", pasted

    rows = status_rows(up)
    assert sorted((row[0], row[1]) for row in rows) == [("decode-0", "decode"), ("prefill-0", "prefill")]
    by_id = {c["name"]: c["address"] for c in state["children"]}
    assert all(row[2] == by_id[row[0]] for row in rows)
    pools = json.loads(up.tandem("status", "--json").stdout)["pools"]
    assert [(p["role"], p["workers"]) for p in pools] == [("prefill", 1), ("decode", 1)]

    stop_and_check_no_orphans(up)
    gone = up.tandem("status", "--redis-url", state["redis_url"], "--cluster", up.cluster)
    assert gone.returncode == 1 and "cannot read cluster state from Redis" in gone.stderr


def test_up_colocated_serves_without_prefill_pool(
    tmp_path: Path, tiny_model_dir: Path, expected_content: str, started: list[UpProcess]
) -> None:
    up = UpProcess.start(tmp_path, tiny_model_dir, "--prefill", "0", "--decode", "1")
    started.append(up)
    assert "colocated" in "".join(up.stdout)
    status, body = chat(up.state["endpoint"], up.banner_value("model"))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected_content
    assert [(row[0], row[1]) for row in status_rows(up)] == [("decode-0", "decode")]
    stop_and_check_no_orphans(up, ctrl_c=True)
    assert wait_until(lambda: "SIGINT received; stopping the cluster" in "".join(up.stderr), 5)


def test_up_children_die_with_a_sigkilled_up(tmp_path: Path, tiny_model_dir: Path, started: list[UpProcess]) -> None:
    up = UpProcess.start(tmp_path, tiny_model_dir, "--prefill", "1", "--decode", "1")
    started.append(up)
    pids = [child["pid"] for child in up.state["children"]]
    up.proc.kill()
    up.proc.wait(10)
    assert wait_until(lambda: not any(pid_alive(pid) for pid in pids), STOP_TIMEOUT_S), [
        pid for pid in pids if pid_alive(pid)
    ]
    assert pids_with_arg(up.cluster) == []


def test_up_failed_start_reports_the_child_and_leaves_nothing(tmp_path: Path, started: list[UpProcess]) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "TANDEM_CACHE_DIR": str(tmp_path / "cache")}
    cluster = f"e2e-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tandem",
            "up",
            "--port",
            str(free_port()),
            "--model",
            str(not_a_model),
            "--cluster",
            cluster,
            "--prefill",
            "0",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "tandem up: error: the local cluster did not start" in result.stderr
    assert "before it was ready; its last output:" in result.stderr
    # The launcher logs every child it starts: "started NAME (pid N)".
    children = dict(re.findall(r"started (\S+) \(pid (\d+)\)", result.stderr))
    assert sorted(children) == ["decode-0", "gateway", "redis"]
    assert [name for name, pid in children.items() if pid_alive(int(pid))] == []
    assert pids_with_arg(cluster) == [] and pids_with_arg(str(not_a_model)) == []
    assert not (tmp_path / "cache" / "up.json").exists()


def test_up_sigterm_during_start_up_stops_everything(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "TANDEM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    cluster = f"e2e-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem",
            "up",
            "--port",
            str(free_port()),
            "--model",
            str(tiny_model_dir),
            "--kv-cache-mib",
            "8",
            "--cluster",
            cluster,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    try:
        assert wait_until(lambda: any("started gateway" in line for line in stderr), 60), "".join(stderr)
        proc.send_signal(signal.SIGTERM)  # the workers are still loading
        assert proc.wait(STOP_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert wait_until(lambda: "tandem up: stopped during start-up\n" in stderr, 5), "".join(stderr)
    children = dict(re.findall(r"started (\S+) \(pid (\d+)\)", "".join(stderr)))
    assert sorted(children) == ["decode-0", "gateway", "prefill-0", "redis"]
    assert [name for name, pid in children.items() if pid_alive(int(pid))] == []
    assert pids_with_arg(cluster) == []
    assert not (tmp_path / "cache" / "up.json").exists()


def test_up_locks_the_plane_and_keeps_its_secrets_out_of_logs(
    tmp_path: Path, tiny_model_dir: Path, expected_content: str, started: list[UpProcess]
) -> None:
    """Without a token of its own, `tandem up` generates one and a password for its Redis; the
    cluster serves (with a KV hand-off), the workers refuse calls without the token, Redis
    refuses clients without the password, and neither secret appears on any command line, in
    the banner, in `tandem status` or in any log line of the cluster."""
    import grpc
    import redis as redis_py

    from tandem.common.pb import tandem_pb2 as pb
    from tandem.common.plane_auth import MISSING_MESSAGE, TOKEN_ENV, ClusterToken, sync_channel
    from tandem.common.redis_url import redact

    up = UpProcess.start(
        tmp_path,
        tiny_model_dir,
        "--prefill",
        "1",
        "--decode",
        "1",
        "--local-prefill-max-tokens",
        "0",
        unset=(TOKEN_ENV,),
    )
    started.append(up)
    state = up.state
    token, redis_url = state["cluster_token"], state["redis_url"]
    password = urlsplit(redis_url).password
    assert len(token) == 43 and password is not None and len(password) == 32
    assert oct(up.state_path.stat().st_mode & 0o777) == "0o600"
    assert up.banner_value("redis") == redact(redis_url) == redis_url.replace(password, "***")

    status, body = chat(up.banner_value("endpoint"), up.banner_value("model"))
    assert status == 200 and body["choices"][0]["message"]["content"] == expected_content
    prefill_metrics = next(c["metrics_port"] for c in state["children"] if c["name"] == "prefill-0")
    assert metric(prefill_metrics, "tandem_leases_granted_total") >= 1  # a KV hand-off under the token

    workers = {c["name"]: c["address"] for c in state["children"] if c["name"] in ("prefill-0", "decode-0")}
    for address in workers.values():
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/tandem.v1.Worker/Health")(pb.HealthRequest().SerializeToString(), timeout=5)
            assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, MISSING_MESSAGE)
        with sync_channel(address, ClusterToken(token)) as channel:
            channel.unary_unary("/tandem.v1.Worker/Health")(pb.HealthRequest().SerializeToString(), timeout=5)
    port = urlsplit(redis_url).port
    with pytest.raises(redis_py.AuthenticationError):
        redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
    assert redis_py.Redis.from_url(redis_url, socket_timeout=5).ping()

    shown = up.tandem("status")
    assert shown.returncode == 0 and "prefill-0" in shown.stdout, shown.stderr
    drained = up.tandem("drain", "--address", workers["prefill-0"], "--timeout-s", "20")  # token from up.json
    assert drained.returncode == 0 and json.loads(drained.stdout)["event"] == "drained", drained.stderr
    for child in state["children"]:
        cmdline = Path(f"/proc/{child['pid']}/cmdline").read_bytes().decode(errors="replace")
        assert token not in cmdline and password not in cmdline, child["name"]

    stop_and_check_no_orphans(up)
    logs = "".join(up.stdout + up.stderr) + shown.stdout + shown.stderr + drained.stdout + drained.stderr
    assert "[gateway]" in logs and "[decode-0]" in logs and "[prefill-0]" in logs  # the children's own lines
    assert token not in logs and password not in logs
