"""`tandem status`: the live workers of a cluster, a summary per pool, and what each gateway
makes of them (its routing mode, and the workers it refuses as incompatible, with why), read
from Redis.

`collect()` reads the registry and the gateways' views (`ClusterState`; each gateway's
scheduler publishes its view on every refresh, `tandem.common.gateway_view`); `summarize()` is
a pure function of them; `render()` turns the result into the tables that are printed. A
worker's status is `ok` when every live gateway routes to it, `incompatible` when one refuses
it, and `-` when no gateway is live (nobody has judged it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from tandem.common.cluster_state import ClusterState
from tandem.common.gateway_view import GatewayView
from tandem.common.redis_url import redact
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.launcher.state_file import UpState

REDIS_TIMEOUT_S = 2.0
NO_LOAD = "-"


@dataclass(frozen=True)
class WorkerRow:
    worker_id: str
    role: str
    address: str
    waiting: int | None  # None: no load published yet (or it expired)
    running: int | None
    queued_prefill_tokens: int | None
    kv_usage_perc: float | None  # 0..100
    incompatible: str | None = None  # why the gateways refuse it ("; " between differing reasons)
    spec_acceptance_perc: float | None = None  # speculative decoding: accepted / drafted tokens, 0..100
    kv_cache_dtype: str = ""  # `--kv-cache-dtype` it published ("" from an older worker: shown as -)
    kv_blocks: int = 0  # its KV pool's block count


@dataclass(frozen=True)
class PoolRow:
    role: str
    workers: int
    waiting: int  # the pool's queue depth
    running: int
    kv_usage_perc: float  # used / total blocks over the pool's workers with a load, 0..100


@dataclass(frozen=True)
class GatewayRow:
    gateway_id: str
    routing_mode: str  # a RoutingMode value
    refused: int  # workers it refuses


@dataclass(frozen=True)
class ClusterStatus:
    cluster: str
    workers: tuple[WorkerRow, ...]
    pools: tuple[PoolRow, ...]
    gateways: tuple[GatewayRow, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "cluster": self.cluster,
            "workers": [asdict(w) for w in self.workers],
            "pools": [asdict(p) for p in self.pools],
            "gateways": [asdict(g) for g in self.gateways],
        }


def summarize(
    cluster: str,
    workers: list[WorkerInfo],
    loads: dict[str, WorkerLoad | None],
    gateways: list[GatewayView] | None = None,
) -> ClusterStatus:
    """Rows sorted by (role, id), prefill first, one pool row per role (even if empty), and one
    row per gateway view, sorted by id."""
    views = sorted(gateways or [], key=lambda v: v.gateway_id)
    reasons: dict[str, list[str]] = {}
    for view in views:
        for worker_id, why in view.refused:
            if why not in reasons.setdefault(worker_id, []):
                reasons[worker_id].append(why)
    rows = []
    for info in sorted(workers, key=lambda w: (w.role.value != WorkerRole.PREFILL.value, w.worker_id)):
        load = loads.get(info.worker_id)
        refusals = reasons.get(info.worker_id)
        rows.append(
            WorkerRow(
                worker_id=info.worker_id,
                role=info.role.value,
                address=info.address,
                waiting=load.waiting if load else None,
                running=load.running if load else None,
                queued_prefill_tokens=load.queued_prefill_tokens if load else None,
                kv_usage_perc=100.0 * load.kv_cache_usage if load else None,
                incompatible="; ".join(refusals) if refusals else None,
                spec_acceptance_perc=_percent(load.spec_acceptance_rate) if load else None,
                kv_cache_dtype=info.kv_cache_dtype,
                kv_blocks=info.capacity_blocks,
            )
        )
    pools = []
    for role in (WorkerRole.PREFILL, WorkerRole.DECODE):
        members = [w for w in workers if w.role is role]
        pool_loads = [load for w in members if (load := loads.get(w.worker_id)) is not None]
        used = sum(load.kv_blocks_used for load in pool_loads)
        total = sum(load.kv_blocks_total for load in pool_loads)
        pools.append(
            PoolRow(
                role=role.value,
                workers=len(members),
                waiting=sum(load.waiting for load in pool_loads),
                running=sum(load.running for load in pool_loads),
                kv_usage_perc=100.0 * used / total if total else 0.0,
            )
        )
    gateway_rows = tuple(GatewayRow(v.gateway_id, v.routing_mode.value, len(v.refused)) for v in views)
    return ClusterStatus(cluster, tuple(rows), tuple(pools), gateway_rows)


def collect(state: ClusterState, cluster: str) -> ClusterStatus:
    """Read the live workers, their loads and the gateways' views (raises redis errors to the
    caller)."""
    workers = state.list_workers()
    loads = {w.worker_id: state.get_load(w.worker_id) for w in workers}
    return summarize(cluster, workers, loads, state.list_gateway_views())


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _cell(value: int | float | None, percent: bool = False) -> str:
    if value is None:
        return NO_LOAD
    return f"{value:.1f}%" if percent else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def _worker_status(row: WorkerRow, status: ClusterStatus) -> str:
    if row.incompatible is not None:
        return "incompatible"
    return "ok" if status.gateways else NO_LOAD


def render(status: ClusterStatus) -> str:
    """The human tables: workers (then why each incompatible one is refused), pools, gateways."""
    lines = [f"cluster {status.cluster}: {len(status.workers)} live worker(s)", ""]
    if status.workers:
        lines += _table(
            [
                "WORKER",
                "ROLE",
                "ADDRESS",
                "WAITING",
                "RUNNING",
                "QUEUED_PREFILL_TOKENS",
                "KV_USE",
                "KV_DTYPE",
                "KV_BLOCKS",
                "SPEC_ACCEPT",
                "STATUS",
            ],
            [
                [
                    w.worker_id,
                    w.role,
                    w.address,
                    _cell(w.waiting),
                    _cell(w.running),
                    _cell(w.queued_prefill_tokens),
                    _cell(w.kv_usage_perc, percent=True),
                    w.kv_cache_dtype or NO_LOAD,
                    str(w.kv_blocks),
                    _cell(w.spec_acceptance_perc, percent=True),
                    _worker_status(w, status),
                ]
                for w in status.workers
            ],
        )
        refused = [f"incompatible {w.worker_id}: {w.incompatible}" for w in status.workers if w.incompatible]
        lines += ["", *refused] if refused else []
    else:
        lines.append("no live workers")
    lines.append("")
    lines += _table(
        ["POOL", "WORKERS", "WAITING", "RUNNING", "KV_USE"],
        [
            [p.role, str(p.workers), str(p.waiting), str(p.running), _cell(p.kv_usage_perc, percent=True)]
            for p in status.pools
        ],
    )
    lines.append("")
    if status.gateways:
        lines += _table(
            ["GATEWAY", "ROUTING_MODE", "REFUSED"],
            [[g.gateway_id, g.routing_mode, str(g.refused)] for g in status.gateways],
        )
    else:
        lines.append("no live gateway: routing mode unknown")
    return "\n".join(lines)


@dataclass(frozen=True)
class StatusTarget:
    """Which cluster `tandem status` shows, and where that choice came from (said on stderr and
    in every error, so that a cluster is never shown without saying which one)."""

    redis_url: str
    cluster: str
    source: str  # "--redis", "TANDEM_REDIS_URL" or "the state file PATH"
    from_state_file: bool = False


class NoClusterError(Exception):
    """`tandem status` has no cluster to show, or the one its state file names is gone."""


def find_target(
    flag_url: str | None, env_url: str | None, flag_cluster: str | None, state: UpState | None, state_path: Path
) -> StatusTarget:
    """The cluster to show: `--redis`, else `TANDEM_REDIS_URL`, else the running `tandem up`'s
    state file. The cluster name is `--cluster`, else the state file's when it names the same
    Redis, else "default". Raises `NoClusterError` (its message says what to do) when there is
    none, or when the state file's `tandem up` is no longer running: its cluster is gone."""
    for url, source in ((flag_url, "--redis"), (env_url, "TANDEM_REDIS_URL")):
        if url:
            same = state is not None and state.redis_url == url
            cluster = flag_cluster or (state.cluster if state is not None and same else "default")
            return StatusTarget(url, cluster, source)
    if state is None:
        raise NoClusterError(
            f"no cluster to show: pass --redis URL or set TANDEM_REDIS_URL (no running `tandem up`: "
            f"{state_path} does not exist)"
        )
    if not state.owner_running():
        raise NoClusterError(
            f"the cluster {state.cluster!r} named in {state_path} is gone: its `tandem up` (pid {state.pid}) is "
            "not running; pass --redis URL or set TANDEM_REDIS_URL to show another cluster"
        )
    return StatusTarget(state.redis_url, flag_cluster or state.cluster, f"the state file {state_path}", True)


def run_status(redis_url: str, cluster: str, as_json: bool = False, *, target: StatusTarget | None = None) -> int:
    """Print the cluster's status; 1 with a message on stderr if Redis cannot be reached (for a
    cluster found through its state file: the cluster is gone). `target`, when given, says
    on stderr which cluster this is and where it came from."""
    if target is not None:
        print(f"tandem status: cluster {cluster!r} at {redact(redis_url)} (from {target.source})", file=sys.stderr)
    client = redis.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
    try:
        status = collect(ClusterState(client, cluster), cluster)
    except (redis.RedisError, OSError) as exc:
        if target is not None and target.from_state_file:
            print(
                f"tandem: error: the cluster {cluster!r} named in {target.source.removeprefix('the state file ')} "
                f"is gone: its Redis at {redact(redis_url)} does not answer ({exc})",
                file=sys.stderr,
            )
        else:
            print(f"tandem: error: cannot read cluster state from Redis at {redact(redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(status.to_json(), indent=2) if as_json else render(status))
    return 0
