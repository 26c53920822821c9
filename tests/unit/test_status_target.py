"""`tandem status` finds its cluster from `--redis`, then TANDEM_REDIS_URL, then the state file
of a running `tandem up`; a state file whose cluster is gone is an error, never a stale table."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.common.embedded_redis import EmbeddedRedis
from tandem.launcher.state_file import UpState, write_state
from tandem.launcher.status import NoClusterError, StatusTarget, find_target

REPO_ROOT = Path(__file__).resolve().parents[2]
PATH = Path("/cache/up.json")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _free_port() -> int:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _state(url: str = "redis://s:1/0", cluster: str = "up-c", pid: int | None = None) -> UpState:
    return UpState(redis_url=url, cluster=cluster, endpoint="http://127.0.0.1:8000", pid=pid or os.getpid())


@pytest.mark.parametrize(
    ("flag", "env", "cluster", "state", "expected"),
    [
        # the flag first, the environment next; the state file's cluster name when it is the same Redis
        ("redis://f:1/0", "redis://e:1/0", None, None, StatusTarget("redis://f:1/0", "default", "--redis")),
        (None, "redis://e:1/0", None, None, StatusTarget("redis://e:1/0", "default", "TANDEM_REDIS_URL")),
        ("redis://s:1/0", None, None, _state(), StatusTarget("redis://s:1/0", "up-c", "--redis")),
        (None, "redis://s:1/0", "mine", _state(), StatusTarget("redis://s:1/0", "mine", "TANDEM_REDIS_URL")),
        ("redis://f:1/0", None, None, _state(), StatusTarget("redis://f:1/0", "default", "--redis")),
        # a flag or the environment wins even over a stale state file
        ("redis://f:1/0", None, None, _state(pid=-1), StatusTarget("redis://f:1/0", "default", "--redis")),
        # then the running `tandem up`'s state file
        (None, None, None, _state(), StatusTarget("redis://s:1/0", "up-c", f"the state file {PATH}", True)),
        (None, None, "x", _state(), StatusTarget("redis://s:1/0", "x", f"the state file {PATH}", True)),
    ],
)
def test_where_status_finds_its_cluster(
    flag: str | None, env: str | None, cluster: str | None, state: UpState | None, expected: StatusTarget
) -> None:
    if state is not None and state.pid == -1:
        state = _state(pid=_dead_pid())
    assert find_target(flag, env, cluster, state, PATH) == expected


def test_nothing_to_show_says_how_to_name_one() -> None:
    with pytest.raises(NoClusterError) as info:
        find_target(None, "", None, None, PATH)
    assert str(info.value) == (
        "no cluster to show: pass --redis URL or set TANDEM_REDIS_URL (no running `tandem up`: "
        "/cache/up.json does not exist)"
    )


def test_a_state_file_whose_tandem_up_is_dead_names_a_cluster_that_is_gone() -> None:
    pid = _dead_pid()
    with pytest.raises(NoClusterError) as info:
        find_target(None, None, None, _state(pid=pid), PATH)
    assert str(info.value) == (
        f"the cluster 'up-c' named in /cache/up.json is gone: its `tandem up` (pid {pid}) is not running; "
        "pass --redis URL or set TANDEM_REDIS_URL to show another cluster"
    )


def _status(tmp_path: Path, *argv: str, redis_env: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_REDIS_URL"}
    env |= {"TANDEM_CACHE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    if redis_env is not None:
        env["TANDEM_REDIS_URL"] = redis_env
    return subprocess.run(
        [sys.executable, "-m", "tandem", "status", *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_refuses_a_stale_state_file_and_shows_the_named_cluster_instead(tmp_path: Path) -> None:
    port = _free_port()
    write_state(tmp_path / "up.json", _state(url=f"redis://127.0.0.1:{port}/0", pid=_dead_pid()))
    stale = _status(tmp_path)
    assert stale.returncode == 1 and stale.stdout == ""
    assert f"the cluster 'up-c' named in {tmp_path / 'up.json'} is gone" in stale.stderr

    # the `tandem up` still runs (this process) but its Redis is gone: said plainly, exit 1
    write_state(tmp_path / "up.json", _state(url=f"redis://127.0.0.1:{port}/0"))
    gone = _status(tmp_path)
    assert gone.returncode == 1 and gone.stdout == ""
    assert (
        f"tandem: error: the cluster 'up-c' named in {tmp_path / 'up.json'} is gone: its Redis at "
        f"redis://127.0.0.1:{port}/0 does not answer"
    ) in gone.stderr

    server = EmbeddedRedis.start()
    try:
        for result, source in (
            (_status(tmp_path, "--redis", server.url, "--json"), "--redis"),
            (_status(tmp_path, "--json", redis_env=server.url), "TANDEM_REDIS_URL"),
        ):
            assert result.returncode == 0, result.stderr
            assert f"tandem status: cluster 'default' at {server.url} (from {source})" in result.stderr
            assert '"cluster": "default"' in result.stdout
    finally:
        server.stop()


def test_cli_reports_a_malformed_state_file(tmp_path: Path) -> None:
    (tmp_path / "up.json").write_text("[]")
    result = _status(tmp_path)
    assert result.returncode == 1
    assert f"tandem: error: {tmp_path / 'up.json'} is not a `tandem up` state file" in result.stderr
