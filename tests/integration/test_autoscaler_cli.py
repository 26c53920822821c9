"""`tandem autoscaler` as a real process: Redis (embedded) and a stand-in Kubernetes API server
(`kube_api.FakeKubeApi`: no real API server can run here). It scales the prefill Deployment,
serves its metrics, and exits 0 on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request

from tandem.common.cluster_state import ClusterState
from tandem.common.embedded_redis import free_port
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tests.integration.kube_api import FakeKubeApi
from tests.integration.workers import REPO_ROOT


def test_autoscaler_process_scales_serves_metrics_and_exits_on_sigterm(redis_server, redis_client, tmp_path):
    state = ClusterState(redis_client, "cli")
    state.register(WorkerInfo("p-0", WorkerRole.PREFILL, "p-0:7000", "ab12", 100, "t"), ttl_s=60.0)
    state.register(WorkerInfo("d-0", WorkerRole.DECODE, "d-0:7000", "ab12", 100, "t"), ttl_s=60.0)
    state.publish_load("p-0", WorkerLoad(0, 1, 6000, 0, 100, time.time()), ttl_s=60.0)
    state.publish_load("d-0", WorkerLoad(4, 1, 0, 0, 100, time.time()), ttl_s=60.0)
    metrics_port = free_port()
    with FakeKubeApi({("serving", "tp"): 1, ("serving", "td"): 1}) as api:
        cmd = [
            sys.executable,
            "-m",
            "tandem",
            "autoscaler",
            "--redis",
            redis_server.url,
            "--cluster",
            "cli",
            "--kubeconfig",
            str(api.write_kubeconfig(tmp_path / "kubeconfig")),
            "--namespace",
            "serving",
            "--prefill-deployment",
            "tp",
            "--decode-deployment",
            "td",
            "--prefill-min",
            "0",
            "--prefill-target-queued-tokens",
            "1000",
            "--prefill-max",
            "8",
            "--interval-s",
            "0.1",
            "--metrics-port",
            str(metrics_port),
        ]
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr_lines: list[str] = []
        reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 30.0
            while api.deployments[("serving", "tp")] != 6 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert api.deployments == {("serving", "tp"): 6, ("serving", "td"): 1}, "".join(stderr_lines)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            assert 'tandem_autoscaler_desired_replicas{pool="prefill"} 6.0' in text.splitlines()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=15)
            reader.join(5)
    assert returncode == 0, "".join(stderr_lines)
    assert (
        "tandem autoscaler: INFO pool=prefill current=1 desired=6 direction=up reason=queue_above_target "
        "signals=fresh workers=1 queued_prefill_tokens=6000 waiting=0 running=1 kv_usage=0.000\n"
    ) in stderr_lines
    assert stderr_lines[-1] == "tandem autoscaler: INFO SIGTERM received; stopping the autoscaler\n"
