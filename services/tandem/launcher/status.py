"""`tandem status`: the live workers of a cluster and a summary per pool, read from Redis.

`collect()` reads the registry (`ClusterState`); `summarize()` is a pure function of the
workers and their loads; `render()` turns the result into the table that is printed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

import redis

from tandem.common.cluster_state import ClusterState
from tandem.common.redis_url import redact
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole

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


@dataclass(frozen=True)
class PoolRow:
    role: str
    workers: int
    waiting: int  # the pool's queue depth
    running: int
    kv_usage_perc: float  # used / total blocks over the pool's workers with a load, 0..100


@dataclass(frozen=True)
class ClusterStatus:
    cluster: str
    workers: tuple[WorkerRow, ...]
    pools: tuple[PoolRow, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "cluster": self.cluster,
            "workers": [asdict(w) for w in self.workers],
            "pools": [asdict(p) for p in self.pools],
        }


def summarize(cluster: str, workers: list[WorkerInfo], loads: dict[str, WorkerLoad | None]) -> ClusterStatus:
    """Rows sorted by (role, id), prefill first, and one pool row per role (even if empty)."""
    rows = []
    for info in sorted(workers, key=lambda w: (w.role.value != WorkerRole.PREFILL.value, w.worker_id)):
        load = loads.get(info.worker_id)
        rows.append(
            WorkerRow(
                worker_id=info.worker_id,
                role=info.role.value,
                address=info.address,
                waiting=load.waiting if load else None,
                running=load.running if load else None,
                queued_prefill_tokens=load.queued_prefill_tokens if load else None,
                kv_usage_perc=100.0 * load.kv_cache_usage if load else None,
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
    return ClusterStatus(cluster, tuple(rows), tuple(pools))


def collect(state: ClusterState, cluster: str) -> ClusterStatus:
    """Read the live workers and their loads (raises redis errors to the caller)."""
    workers = state.list_workers()
    return summarize(cluster, workers, {w.worker_id: state.get_load(w.worker_id) for w in workers})


def _cell(value: int | float | None, percent: bool = False) -> str:
    if value is None:
        return NO_LOAD
    return f"{value:.1f}%" if percent else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def render(status: ClusterStatus) -> str:
    """The human table: workers, then pools."""
    lines = [f"cluster {status.cluster}: {len(status.workers)} live worker(s)", ""]
    if status.workers:
        lines += _table(
            ["WORKER", "ROLE", "ADDRESS", "WAITING", "RUNNING", "QUEUED_PREFILL_TOKENS", "KV_USE"],
            [
                [
                    w.worker_id,
                    w.role,
                    w.address,
                    _cell(w.waiting),
                    _cell(w.running),
                    _cell(w.queued_prefill_tokens),
                    _cell(w.kv_usage_perc, percent=True),
                ]
                for w in status.workers
            ],
        )
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
    return "\n".join(lines)


def run_status(redis_url: str, cluster: str, as_json: bool = False) -> int:
    """Print the cluster's status; 1 with a message on stderr if Redis cannot be reached."""
    client = redis.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
    try:
        status = collect(ClusterState(client, cluster), cluster)
    except (redis.RedisError, OSError) as exc:
        print(f"tandem: error: cannot read cluster state from Redis at {redact(redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(status.to_json(), indent=2) if as_json else render(status))
    return 0
