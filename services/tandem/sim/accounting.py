"""From a finished `ClusterSim` to its `SimResult` (percentiles, throughput, goodput, pools)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tandem.common.workers import WorkerRole
from tandem.scheduler.types import RouteKind
from tandem.sim.results import Latency, PoolUsage, Records, SimResult, Slo
from tandem.sim.types import TraceRequest
from tandem.sim.worker import SimWorker


def summarize(
    records: Records,
    trace: Sequence[TraceRequest],
    workers: Sequence[SimWorker],
    routes: Mapping[RouteKind, int],
    slo: Slo | None,
    end_s: float,
    num_scale_changes: int,
    num_events: int,
) -> SimResult:
    """The result of a run that ended at `end_s`; `workers` are all that were ever started (a
    draining or retired one has `draining` set), each with `down_at_s` set."""
    ttft, itl, e2e = records.summary_times()
    duration_s = trace[-1].arrival_s - trace[0].arrival_s if len(trace) > 1 else 0.0
    span_s = duration_s if duration_s > 0 else max(end_s, 1e-9)
    output_tokens = sum(records.output_tokens)
    num_good = None if slo is None else records.num_good(slo)
    pools = []
    for role in WorkerRole:
        members = [w for w in workers if w.info.role is role]
        up_s = sum(max(0.0, (w.down_at_s if w.down_at_s is not None else end_s) - w.up_since_s) for w in members)
        busy_s = sum(w.busy_s for w in members)
        pools.append(
            PoolUsage(
                role.value,
                sum(1 for w in members if not w.draining),
                _max_concurrent(members),
                busy_s / up_s if up_s > 0 else 0.0,
            )
        )
    num_preemptions = sum(w.model.num_preemptions for w in workers)
    return SimResult(
        num_requests=len(trace),
        num_completed=len(e2e),
        num_failed=records.failed,
        duration_s=duration_s,
        makespan_s=end_s,
        ttft=Latency.of(ttft),
        itl=Latency.of(itl),
        e2e=Latency.of(e2e),
        output_tokens_per_s=output_tokens / span_s,
        requests_per_s=len(e2e) / span_s,
        goodput_rps=None if num_good is None else num_good / span_s,
        num_good=num_good,
        pools=tuple(pools),
        num_disaggregated=routes[RouteKind.DISAGGREGATED],
        num_local_prefill=routes[RouteKind.LOCAL_PREFILL],
        num_preemptions=num_preemptions,
        num_scale_changes=num_scale_changes,
        num_events=num_events,
    )


def _max_concurrent(members: Sequence[SimWorker]) -> int:
    """The most workers of the list that were up at once."""
    edges: list[tuple[float, int]] = []
    for w in members:
        edges.append((w.up_since_s, 1))
        if w.down_at_s is not None:
            edges.append((w.down_at_s, -1))
    edges.sort(key=lambda e: (e[0], e[1]))
    best = now = 0
    for _, delta in edges:
        now += delta
        best = max(best, now)
    return best
