"""`tandem up`: start a `LocalCluster`, say how to use it, and hold it until told to stop.

Lifecycle:
1. SIGINT and SIGTERM handlers are installed first; they only set a flag (no locks are taken
   in a handler), which start-up and the wait loop poll.
2. The cluster starts (bounded). On failure the error, with the failed child's last output,
   goes to stderr and the exit code is 1.
3. The endpoint, the processes and a ready-to-paste curl command go to stdout (the Redis URL
   with its password redacted, the cluster token never), and the state file (`up.json`,
   readable by its owner only: it holds both) is written.
4. The main thread waits. With `--autoscale`, an autoscaler thread reads the pools' queue
   depth from Redis and sets targets; the wait loop applies them (`LocalActuator.apply`:
   spawns workers, or drains the newest ones) and rewrites the state file when the
   processes changed. A child that dies on its own (a worker, the gateway or our Redis) is
   restarted by the `Supervisor` (supervisor.py), with backoff, and the state file is
   rewritten; one that dies more often than `--restart-max` within `--restart-window-s`
   stops the rest and exits 1. A signal stops the autoscaler, then the cluster (gateway,
   workers, Redis), and exits 0. The state file is removed.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

import redis

from tandem.autoscaler.autoscaler import Autoscaler
from tandem.autoscaler.config import AutoscalerConfig
from tandem.autoscaler.local import LocalActuator
from tandem.autoscaler.metrics import AutoscalerMetrics
from tandem.common.cluster_state import ClusterState
from tandem.common.redis_url import redact
from tandem.common.workers import WorkerRole
from tandem.launcher.config import LocalClusterConfig
from tandem.launcher.local import ClusterStartError, LocalCluster
from tandem.launcher.placement import WorkerPlacement
from tandem.launcher.ready import StartCancelled
from tandem.launcher.state_file import UpState, remove_state, write_state
from tandem.launcher.supervisor import RestartLimitReached, Supervisor

logger = logging.getLogger(__name__)

WAIT_INTERVAL_S = 0.2
HTTP_TIMEOUT_S = 5.0
EXAMPLE_PROMPT = "Hello! Who are you?"


class StopRequest:
    """Set by the signal handlers, read by the main thread. A plain attribute: a handler must
    not take locks (it runs between two bytecodes of a thread that may hold them)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


def served_model_name(endpoint: str, api_key: str | None, fallback: str) -> str:
    """The first model id of `GET /v1/models`, or `fallback` if the gateway does not say."""
    request = urllib.request.Request(f"{endpoint}/v1/models")
    if api_key is not None:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            data = json.load(response)
        return str(data["data"][0]["id"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        logger.warning("could not read the served model from %s/v1/models: %s", endpoint, exc)
        return fallback


def curl_example(endpoint: str, model: str, api_key: str | None) -> str:
    """One shell line that sends a chat completion to the cluster."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": EXAMPLE_PROMPT}], "max_tokens": 32})
    auth = f" -H {shlex.quote(f'Authorization: Bearer {api_key}')}" if api_key is not None else ""
    return (
        f"curl -s {shlex.quote(endpoint + '/v1/chat/completions')}"
        f" -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"
    )


def _banner(cluster: LocalCluster, model: str) -> str:
    config = cluster.config
    mode = (
        f"{config.num_prefill} prefill + {config.num_decode} decode worker(s)"
        if config.num_prefill
        else f"{config.num_decode} decode worker(s), colocated (no prefill pool)"
    )
    lines = [
        f"tandem up: cluster '{config.cluster}' is ready: {mode}",
        f"  endpoint: {cluster.endpoint}",
        f"  model:    {model}",
        f"  redis:    {redact(cluster.redis_url)}",
        f"  internal: {_plane_line(cluster)}",
        f"  processes (tandem up itself is pid {os.getpid()}):",
    ]
    children = cluster.children()
    width = max(len(child.name) for child in children)
    for child in children:
        where = f"  {child.address}" if child.address else ""
        metrics = f"  (metrics on port {child.metrics_port})" if child.metrics_port else ""
        lines.append(f"    {child.name.ljust(width)}  pid {child.pid}{where}{metrics}")
    api_key = config.api_keys[0] if config.api_keys else None
    lines += [
        "",
        "Try it:",
        f"  {curl_example(cluster.endpoint, model, api_key)}",
        "",
        f"Status: tandem status    Stop: Ctrl-C (or kill -TERM {os.getpid()})",
    ]
    return "\n".join(lines)


def _plane_line(cluster: LocalCluster) -> str:
    if cluster.token is None:
        return "NO authentication on the workers' gRPC plane (--insecure-no-auth)"
    return "every worker RPC requires the cluster token (in up.json, mode 0600; `tandem drain` reads it)"


def _write_state(path: Path, cluster: LocalCluster) -> None:
    write_state(
        path,
        UpState(
            redis_url=cluster.redis_url,
            cluster=cluster.config.cluster,
            endpoint=cluster.endpoint,
            pid=os.getpid(),
            children=tuple(cluster.children()),
            cluster_token=cluster.token,
        ),
    )


@dataclass(frozen=True)
class _Autoscaling:
    """The autoscaler thread of `tandem up --autoscale` and the actuator it drives."""

    autoscaler: Autoscaler
    actuator: LocalActuator

    @classmethod
    def start(cls, cluster: LocalCluster, config: AutoscalerConfig) -> _Autoscaling:
        state = ClusterState(redis.Redis.from_url(cluster.redis_url, socket_timeout=2.0), cluster.config.cluster)
        actuator = LocalActuator(
            {
                WorkerRole.PREFILL: cluster.pool_size(WorkerRole.PREFILL),
                WorkerRole.DECODE: cluster.pool_size(WorkerRole.DECODE),
            }
        )
        autoscaler = Autoscaler(state, actuator, config, AutoscalerMetrics())
        autoscaler.start()
        return cls(autoscaler, actuator)


def run_up(
    config: LocalClusterConfig, state_path: Path, out: TextIO | None = None, placement: WorkerPlacement | None = None
) -> int:
    """Run a cluster until SIGINT/SIGTERM. Exit code: 0 after a requested stop, 1 on failure.
    `placement` runs the workers (default: local processes; `tandem up --ray`: Ray actors)."""
    out = out if out is not None else sys.stdout
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(config, placement=placement)
    wrote_state = False
    autoscaling: _Autoscaling | None = None
    try:
        try:
            cluster.start(cancelled=lambda: stop.requested)
        except StartCancelled:
            print("tandem up: stopped during start-up", file=sys.stderr)
            return 0
        except ClusterStartError as exc:
            print(f"tandem up: error: {exc}", file=sys.stderr)
            return 1
        api_key = config.api_keys[0] if config.api_keys else None
        model = served_model_name(cluster.endpoint, api_key, fallback=cluster.model_dir.name)
        _write_state(state_path, cluster)
        wrote_state = True
        print(_banner(cluster, model), file=out, flush=True)
        if config.autoscale is not None:
            autoscaling = _Autoscaling.start(cluster, config.autoscale)
        supervisor = Supervisor(cluster, config.restart)
        while not stop.requested:
            if autoscaling is not None and autoscaling.actuator.apply(cluster):
                _write_state(state_path, cluster)
            try:
                if supervisor.poll():
                    _write_state(state_path, cluster)
            except RestartLimitReached as exc:
                print(f"tandem up: error: {exc}\nstopping the cluster", file=sys.stderr, flush=True)
                return 1
            time.sleep(WAIT_INTERVAL_S)
        assert stop.signum is not None
        print(
            f"tandem up: {signal.Signals(stop.signum).name} received; stopping the cluster", file=sys.stderr, flush=True
        )
        return 0
    finally:
        if autoscaling is not None:
            autoscaling.autoscaler.stop()
        cluster.stop()
        if wrote_state:
            remove_state(state_path, os.getpid())
        for sig, handler in previous.items():
            signal.signal(sig, handler)
