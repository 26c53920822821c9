"""`tandem up --ray` end to end, on real Ray: workers as Ray actors, the gateway and Redis local.

One Ray head for the module, started as a user starts one on this machine: a token from
`ray get-auth-token --generate` in a temporary HOME, then `ray start --head --block`, which turns
token authentication on by itself because that token exists (ports outside 10002-19999).
Against it: `tandem up --ray ADDRESS --ray-auth-token-file ...` serves the engine's exact greedy
answer and stops cleanly on SIGTERM; without the token it is refused and says how to fix it;
the `ray` actuator (in this process, a driver on the head's GCS) grows and shrinks the decode pool.
`tandem up --ray` without an address starts its own head and stops it. Every test ends by
checking that no process it caused is left: tandem's children, the actors, their workers, and
for the private head every Ray process.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tandem.launcher.ray_head import RayHead, make_temp_dir
from tests.e2e.test_up import (  # noqa: F401 - `expected_content` and `started` are fixtures
    REPO_ROOT,
    STOP_TIMEOUT_S,
    UpProcess,
    chat,
    expected_content,
    free_port,
    pid_alive,
    pids_with_arg,
    started,
    wait_until,
)

pytestmark = pytest.mark.slow

HEAD_CPUS = 4  # 1 prefill + up to 2 decode actors of the actuator test, and one spare
GONE_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TokenHead:
    head: RayHead
    token_file: Path  # the head's ~/.ray/auth_token


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live process under `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(ppid(int(entry.name)), []).append(int(entry.name))
                cmdlines[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except (OSError, IndexError, ValueError):
                continue
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if pid_alive(child):
                found[child] = cmdlines.get(child, "")
                stack.append(child)
    return found


def alive(pids: list[int] | dict[int, str]) -> list[int]:
    return [pid for pid in pids if pid_alive(pid)]


@pytest.fixture(scope="module")
def token_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenHead]:
    home = tmp_path_factory.mktemp("ray-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    token_file = home / ".ray" / "auth_token"
    assert len(token_file.read_text()) == 64
    head = RayHead.start(make_temp_dir(), env, HEAD_CPUS, timeout_s=120.0, cancelled=lambda: False)
    try:
        yield TokenHead(head, token_file)
    finally:
        ray_processes = descendants(head.pid)
        head.stop()
        assert wait_until(lambda: not alive(ray_processes), GONE_TIMEOUT_S), {
            pid: ray_processes[pid] for pid in alive(ray_processes)
        }


def worker_and_actor_pids(up: UpProcess) -> list[int]:
    """The worker processes of `tandem up --ray` and the Ray actor process above each one."""
    workers = [c["pid"] for c in up.state["children"] if c["name"].startswith(("prefill-", "decode-"))]
    actors = [ppid(pid) for pid in workers]
    cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in actors]
    assert all(line.startswith(b"ray::WorkerActor") for line in cmdlines), cmdlines
    return workers + actors


def stop_and_check_nothing_left(up: UpProcess, pids: list[int]) -> str:
    """SIGTERM: exit 0, in order (gateway, workers drained, Ray head if ours, Redis), then no
    process of `pids` nor with the cluster's name left. Returns `tandem up`'s stderr."""
    assert pids and alive(pids) == pids
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(STOP_TIMEOUT_S) == 0, up.stderr_tail()
    assert wait_until(lambda: not alive(pids), GONE_TIMEOUT_S), alive(pids)
    assert pids_with_arg(up.cluster) == []
    assert not up.state_path.exists()
    assert wait_until(lambda: re.search(r"redis \(pid \d+\) stopped", "".join(up.stderr)), 5)
    stderr = "".join(up.stderr).split("SIGTERM received; stopping the cluster", 1)[1]
    order = [stderr.index(f"{name} (pid") for name in ("gateway", "decode-0", "prefill-0", "redis")]
    assert order == sorted(order), stderr
    for worker in ("decode-0", "prefill-0"):  # drained: a clean exit, not a kill
        assert re.search(worker + r" \(pid \d+\) stopped \(exit code 0\)", stderr), stderr
    return stderr


def test_up_ray_joins_a_token_cluster_serves_exactly_and_stops_cleanly(
    tmp_path: Path,
    tiny_model_dir: Path,
    expected_content: str,
    token_head: TokenHead,
    started: list[UpProcess],
) -> None:
    # tandem up's HOME has no token: only --ray-auth-token-file lets it in.
    up = UpProcess.start(
        tmp_path,
        tiny_model_dir,
        "--ray",
        token_head.head.address,
        "--ray-auth-token-file",
        str(token_head.token_file),
        "--prefill",
        "1",
        "--decode",
        "1",
        "--local-prefill-max-tokens",
        "0",
    )
    started.append(up)
    assert sorted(c["name"] for c in up.state["children"]) == ["decode-0", "gateway", "prefill-0", "redis"]
    status, body = chat(up.banner_value("endpoint"), up.banner_value("model"))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected_content
    assert "token authentication on (token file" in "".join(up.stderr)

    pids = [c["pid"] for c in up.state["children"]] + worker_and_actor_pids(up)
    stderr = stop_and_check_nothing_left(up, pids)
    assert "Ray head" not in stderr  # not ours: it keeps running
    assert token_head.head.is_running


def test_up_ray_without_the_token_is_refused_and_leaves_nothing(
    tmp_path: Path, tiny_model_dir: Path, token_head: TokenHead
) -> None:
    cluster = f"e2e-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "HOME": str(tmp_path),
        "TANDEM_CACHE_DIR": str(tmp_path / "cache"),
        "RAY_NUM_REDIS_GET_RETRIES": "3",
    }  # Ray's connect window: ~1 s per try, 20 by default
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tandem",
            "up",
            "--ray",
            token_head.head.address,
            "--port",
            str(free_port()),
            "--model",
            str(tiny_model_dir),
            "--cluster",
            cluster,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"cannot connect to the Ray cluster at {token_head.head.address}" in result.stderr
    assert "set RAY_AUTH_MODE=token and give its token (--ray-auth-token-file" in result.stderr
    children = dict(re.findall(r"started (\S+) \(pid (\d+)\)", result.stderr))
    assert sorted(children) == ["gateway", "redis"]  # and no actor was asked for
    assert alive([int(pid) for pid in children.values()]) == [] and pids_with_arg(cluster) == []


def test_up_ray_without_address_starts_and_stops_its_own_head(
    tmp_path: Path,
    tiny_model_dir: Path,
    expected_content: str,
    started: list[UpProcess],
) -> None:
    # HOME is empty: the private head runs with token auth on a fresh token of its own.
    up = UpProcess.start(
        tmp_path, tiny_model_dir, "--ray", "--prefill", "1", "--decode", "1", "--local-prefill-max-tokens", "0"
    )
    started.append(up)
    stderr = "".join(up.stderr)
    assert "a private head" in stderr and "token authentication on (a new token for this head)" in stderr
    status, body = chat(up.banner_value("endpoint"), up.banner_value("model"))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected_content

    everything = descendants(up.proc.pid)  # Redis, gateway, Ray head, Ray's daemons, actors, workers
    heads = [pid for pid, line in everything.items() if "ray.scripts.scripts start --head" in line]
    assert len(heads) == 1
    temp_dir = Path(everything[heads[0]].split("--temp-dir ", 1)[1].split()[0])
    assert (temp_dir / "auth_token").is_file()
    pids = list(everything) + worker_and_actor_pids(up)
    stderr = stop_and_check_nothing_left(up, sorted(set(pids)))
    assert stderr.index("prefill-0 (pid") < stderr.index("Ray head (pid") < stderr.index("redis (pid")
    assert not temp_dir.exists()
    assert not (tmp_path / "home" / ".ray").exists()  # the user's ~/.ray is left alone


def worker_pid(cluster: str, worker_id: str) -> int:
    """The pid of the worker process `worker_id` of `cluster` (found by its command line)."""
    (pid,) = [pid for pid in pids_with_arg(f"--worker-id {worker_id} ") if pid in pids_with_arg(cluster)]
    return pid


def test_ray_actuator_grows_and_shrinks_the_decode_pool(
    tmp_path: Path,
    tiny_model_dir: Path,
    expected_content: str,
    token_head: TokenHead,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis

    from tandem.autoscaler.ray import RayActuator
    from tandem.common.cluster_state import ClusterState
    from tandem.common.options import parse
    from tandem.common.workers import WorkerRole
    from tandem.launcher import LocalCluster, LocalClusterConfig
    from tandem.launcher.ray_auth import RayAuth
    from tandem.launcher.ray_cluster import RayCluster
    from tandem.launcher.ray_config import RayConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in [name for name in os.environ if name.startswith("RAY_")]:
        monkeypatch.delenv(name)
    caplog.set_level(logging.INFO, logger="tandem.autoscaler.ray")
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    config = parse(
        LocalClusterConfig,
        ["--port", "0", "--model", str(tiny_model_dir), "--cluster", name, "--kv-cache-mib", "8"]
        + ["--local-prefill-max-tokens", "0", "--drain-timeout-s", "10"],
    )
    # In this process, as a driver on the head's GCS, with the token file. (Through the Ray
    # Client, ray://, Ray's client proxier now and then lost the per-client server it had just
    # forked here: "ZombieProcess" at connect, a failure inside Ray, not of the actuator.)
    ray_cluster = RayCluster(
        config, RayConfig(address=token_head.head.address, auth=RayAuth(token_file=token_head.token_file))
    )
    cluster = LocalCluster(config, placement=ray_cluster)
    cluster.start()
    actuator = RayActuator(ray_cluster)
    client = redis.Redis.from_url(cluster.redis_url)
    state = ClusterState(client, name)

    def registered() -> list[str]:
        return [worker.worker_id for worker in state.list_workers(WorkerRole.DECODE)]

    try:
        assert (actuator.replicas(WorkerRole.PREFILL), actuator.replicas(WorkerRole.DECODE)) == (1, 1)
        actuator.scale(WorkerRole.DECODE, 2)
        assert actuator.replicas(WorkerRole.DECODE) == 2  # starting counts at once
        assert wait_until(lambda: registered() == ["decode-0", "decode-1"], 120), registered()
        newest, oldest = worker_pid(name, "decode-1"), worker_pid(name, "decode-0")
        newest_actor = ppid(newest)

        actuator.scale(WorkerRole.DECODE, 1)  # returns at once; decode-1, the newest, drains
        assert actuator.replicas(WorkerRole.DECODE) == 1  # draining does not count
        assert wait_until(lambda: registered() == ["decode-0"], 30), registered()
        assert wait_until(lambda: not pid_alive(newest), 30)
        assert wait_until(
            lambda: (
                actuator.replicas(WorkerRole.DECODE) == 1
                and any("ray actuator: exited decode-1 (exit code 0)" in r.getMessage() for r in caplog.records)
            ),
            30,
        )
        assert wait_until(lambda: not pid_alive(newest_actor), GONE_TIMEOUT_S)  # the actor is killed too
        assert pid_alive(oldest) and actuator.replicas(WorkerRole.PREFILL) == 1

        status, body = chat(cluster.endpoint, tiny_model_dir.name)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected_content
        with pytest.raises(ValueError, match="replicas must be an int >= 0"):
            actuator.scale(WorkerRole.DECODE, -1)
    finally:
        actuator.close()
        client.close()
        cluster.stop()
    assert wait_until(lambda: pids_with_arg(name) == [], GONE_TIMEOUT_S), pids_with_arg(name)
    assert wait_until(
        lambda: not [line for line in descendants(token_head.head.pid).values() if line.startswith("ray::WorkerActor")],
        GONE_TIMEOUT_S,
    )
    assert "RAY_AUTH_MODE" not in os.environ  # the cluster put our environment back
