"""`tandem up` as a supervisor: a decode worker killed with SIGKILL is restarted (it says so),
rejoins under its worker id and takes traffic again; its embedded Redis killed with SIGKILL is
restarted on the same port and the cluster keeps serving (the worker registers again in the
empty Redis). `tandem up` never stops the cluster meanwhile, and a SIGTERM still stops it with
exit 0 once the pools are drained."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from tandem.common.cluster_state import ClusterState
from tests.e2e.test_up import UpProcess, chat, started, wait_until  # noqa: F401 (started: fixture)
from tests.integration.workers import metric_sum

pytestmark = pytest.mark.slow

RESTART_TIMEOUT_S = 120.0


def child(up: UpProcess, name: str) -> dict:
    return next(c for c in up.state["children"] if c["name"] == name)


def served(up: UpProcess, endpoint: str, model: str) -> bool:
    try:
        return chat(endpoint, model)[0] == 200
    except (OSError, ValueError):  # no answer, or not JSON: not served yet
        return False


def test_up_restarts_a_killed_worker_and_its_redis(
    tmp_path: Path, tiny_model_dir: Path, started: list[UpProcess]
) -> None:
    up = UpProcess.start(tmp_path, tiny_model_dir, "--prefill", "0", "--decode", "1", "--restart-backoff-s", "0.5")
    started.append(up)
    endpoint, model = up.banner_value("endpoint"), up.banner_value("model")
    assert chat(endpoint, model)[0] == 200
    redis_url = up.state["redis_url"]  # with its password (the banner shows it redacted)

    # 1. The decode worker dies: restarted after 0.5 s, and it serves the next requests.
    old = child(up, "decode-0")
    os.kill(old["pid"], signal.SIGKILL)
    said = "decode-0 exited with status -9 (SIGKILL); restarting in 0.5 s (restart 1 of 5)"
    assert wait_until(lambda: said in up.stderr_tail(200), 30.0), up.stderr_tail()
    assert wait_until(
        lambda: child(up, "decode-0")["pid"] != old["pid"] and child(up, "decode-0")["metrics_port"], RESTART_TIMEOUT_S
    ), up.stderr_tail()
    new = child(up, "decode-0")
    assert f"decode-0 restarted (pid {new['pid']})" in up.stderr_tail(200)
    assert wait_until(lambda: served(up, endpoint, model), 60.0, 0.5), up.stderr_tail()
    new_metrics = f"http://127.0.0.1:{new['metrics_port']}/metrics"
    assert metric_sum(new_metrics, "tandem_prompt_tokens_computed_total") > 0  # the new worker took it
    assert up.proc.poll() is None

    # 2. Redis dies: restarted on its port; the worker registers again and requests are served.
    old_redis = child(up, "redis")
    os.kill(old_redis["pid"], signal.SIGKILL)
    said = "redis exited with status -9 (SIGKILL); restarting in 0.5 s (restart 1 of 5)"
    assert wait_until(lambda: said in up.stderr_tail(200), 30.0), up.stderr_tail()
    assert wait_until(lambda: child(up, "redis")["pid"] != old_redis["pid"], 30.0), up.stderr_tail()
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    try:
        state = ClusterState(client, up.cluster)
        assert wait_until(lambda: [w.worker_id for w in state.list_workers()] == ["decode-0"], 30.0)
    finally:
        client.close()
    for _ in range(5):
        assert chat(endpoint, model)[0] == 200
    assert up.proc.poll() is None

    # 3. Drained, then a SIGTERM stops everything with exit 0.
    def drained() -> bool:
        return (
            metric_sum(new_metrics, "vllm:num_requests_running") == 0
            and metric_sum(new_metrics, "vllm:num_requests_waiting") == 0
        )

    assert wait_until(drained, 10.0)
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    time.sleep(0.1)
