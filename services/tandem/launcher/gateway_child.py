"""The local cluster's gateway child: spawned, then probed until it can route (`LocalCluster`).

`spawn_gateway()` starts the gateway (`LocalClusterConfig.gateway_argv` / `gateway_env`, the
cluster's secrets in its environment), on a given port when the cluster restarts it.
`gateway_endpoint()` reads its base URL from its ready line. A ready gateway only listens:
`wait_routable()` then polls it until `GET /ready` answers 200 (a decode worker is routable)
and its `tandem_workers{pool}` gauge counts every worker the cluster started (so the first
request can already use the prefill pool). It fails with `ChildStartError` as soon as any of
the cluster's children exits, or when the deadline passes, and with `StartCancelled` once the
caller asks to stop.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from tandem.launcher.config import ChildSecrets, LocalClusterConfig
from tandem.launcher.placement import WorkerProcess
from tandem.launcher.processes import ChildProcess
from tandem.launcher.ready import ChildStartError, StartCancelled

READY_POLL_INTERVAL_S = 0.1
HTTP_TIMEOUT_S = 2.0
POOL_SIZE_METRIC = "tandem_workers"  # the gateway's live workers per pool


def spawn_gateway(
    config: LocalClusterConfig,
    model_dir: Path,
    child_secrets: ChildSecrets,
    sink: IO[str] | None,
    port: int | None = None,
) -> ChildProcess:
    """Spawn the gateway (not waited for), on `port` if given."""
    return ChildProcess.spawn(
        "gateway",
        config.gateway_argv(model_dir, child_secrets.redis_url, port),
        env=config.gateway_env(child_secrets.environ(os.environ)),
        sink=sink,
    )


def gateway_endpoint(gateway: ChildProcess) -> str:
    """The base URL the ready gateway announced, without a trailing slash."""
    address = gateway.ready.get("address") if gateway.ready else None
    if not isinstance(address, str) or not address.startswith("http"):
        raise ChildStartError(
            f"gateway (pid {gateway.pid}) printed a ready line without an http address: {gateway.ready!r}"
        )
    return address.rstrip("/")


def wait_routable(
    gateway: ChildProcess,
    endpoint: str,
    config: LocalClusterConfig,
    deadline: float,
    cancelled: Callable[[], bool],
    processes: Callable[[], Sequence[WorkerProcess]],
) -> None:
    """Poll the gateway at `endpoint` until it routes to all the cluster's workers; see the
    module doc. `processes()` lists every child of the cluster, to notice one that exited."""
    url = f"{endpoint}/ready"
    last = "no answer yet"
    while True:
        if cancelled():
            raise StartCancelled("cancelled while waiting for the gateway to become ready")
        exited = [child for child in processes() if not child.is_running]
        if exited:
            dead = [f"{child.name} (exit code {child.returncode})" for child in exited]
            raise ChildStartError(
                f"{', '.join(dead)} exited while the cluster was starting; "
                f"last output of {exited[0].name}:\n{exited[0].output_tail()}"
            )
        status, last = _get_status(url)
        if status == 200:
            sizes = _gateway_pool_sizes(endpoint)
            if sizes is None or (
                sizes.get("prefill", 0) >= config.num_prefill and sizes.get("decode", 0) >= config.num_decode
            ):
                return
            last = f"HTTP 200, but the gateway sees workers {sizes}"
        if time.monotonic() >= deadline:
            raise ChildStartError(
                f"gateway (pid {gateway.pid}) never answered 200 on {url} within "
                f"{config.ready_timeout_s} s (last: {last}); its last output:\n"
                f"{gateway.output_tail()}"
            )
        time.sleep(READY_POLL_INTERVAL_S)


def _gateway_pool_sizes(endpoint: str) -> dict[str, int] | None:
    """Live workers per pool as the gateway last saw them (its `tandem_workers{pool}` gauge,
    refreshed every few seconds); {} if /metrics did not answer, None if it lacks the gauge."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"{endpoint}/metrics", timeout=HTTP_TIMEOUT_S) as response:
            text = response.read().decode("utf-8", errors="replace")
        families = [f for f in text_string_to_metric_families(text) if f.name == POOL_SIZE_METRIC]
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return {}
    if not families:
        return None
    sizes: dict[str, int] = {}
    for sample in families[0].samples:
        pool = sample.labels.get("pool", "")
        sizes[pool] = sizes.get(pool, 0) + int(sample.value)
    return sizes


def _get_status(url: str) -> tuple[int | None, str]:
    """(HTTP status, short description) of `GET url`; (None, error) if it did not answer."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        return None, str(exc)
