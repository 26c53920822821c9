"""The in-memory routing path of one request (DESIGN.md section 5): what `Scheduler.route`
runs on the snapshot and the prefix index it holds, with no Redis access (also timed by the bench,
loadtest/tandem/loadtest/bench/scheduler.py).

`route_on` matches the prompt against the index, adjusts the workers' loads by the gateway's own
in-flight work (inflight.py), calls `picker.decide`, and records what it decided: speculative
claims in the index and the new in-flight work. `prefilled_by` and `uncached_prefill_tokens`
name the worker and the work to release when the prompt ran.
"""

from __future__ import annotations

from collections.abc import Mapping

from tandem.common.workers import WorkerInfo, WorkerLoad
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.index import PrefixIndex
from tandem.scheduler.inflight import InflightTable
from tandem.scheduler.picker import decide
from tandem.scheduler.policies import Policy
from tandem.scheduler.registry import RegistrySnapshot
from tandem.scheduler.types import RouteDecision, RouteRequest, WorkerView


def route_on(
    snapshot: RegistrySnapshot,
    index: PrefixIndex,
    request: RouteRequest,
    policy: Policy,
    config: SchedulerConfig,
    now_s: float,
    exclude: frozenset[str] = frozenset(),
    inflight: InflightTable | None = None,
) -> RouteDecision:
    """The in-memory routing path of `Scheduler.route` (also timed by the bench).

    Expires due speculative claims, matches the prompt against the index, builds the views
    (loads adjusted by this gateway's own in-flight work), calls `picker.decide`, then claims
    the prompt's blocks speculatively for the worker that will prefill (P, or D when local)
    and for D (which pulls them from P), and records the new in-flight work. Raises
    NoWorkerError / ValueError from `decide`.
    """
    index.expire(now_s)
    cached = index.match(request.block_hashes, snapshot.worker_ids)
    touched = inflight.touched() if inflight is not None else frozenset()
    prefill = _views(snapshot.prefill, snapshot.prefill_ids, cached, touched, inflight)
    decode = _views(snapshot.decode, snapshot.decode_ids, cached, touched, inflight)
    decision = decide(request, prefill, decode, policy, config, exclude)
    for worker in (decision.prefill, decision.decode):
        if worker is not None:
            index.add_speculative(worker.worker_id, request.block_hashes, now_s)
    if inflight is not None:
        inflight.begin(
            prefilled_by(decision),
            uncached_prefill_tokens(decision, request.num_prompt_tokens),
            decision.decode.worker_id,
            request.num_prompt_tokens,
        )
    return decision


def prefilled_by(decision: RouteDecision) -> str:
    """The worker that runs the prompt: P, or D when it prefills locally."""
    return (decision.prefill or decision.decode).worker_id


def uncached_prefill_tokens(decision: RouteDecision, num_prompt_tokens: int) -> int:
    cached = decision.prefill_cached_tokens if decision.prefill is not None else decision.decode_cached_tokens
    return max(0, num_prompt_tokens - cached)


# `WorkerView` is a frozen slots dataclass: its generated __init__ sets each slot through
# object.__setattr__ (0.7 us a view; a route builds one per worker that holds part of the
# prompt, 50 of 100 in the bench: 35 us). `_view` sets the same slots through their descriptors
# (0.3 us), which is all that __init__ does; tests/unit/test_scheduler_routing_views.py checks
# that the two agree and that WorkerView has no __post_init__ this would skip.
_new_view = object.__new__
_set_info = vars(WorkerView)["info"].__set__  # the slots' member descriptors
_set_load = vars(WorkerView)["load"].__set__
_set_cached = vars(WorkerView)["num_cached_blocks"].__set__


def _view(info: WorkerInfo, load: WorkerLoad | None, num_cached_blocks: int) -> WorkerView:
    """`WorkerView(info, load, num_cached_blocks)`, built without the dataclass __init__."""
    view = _new_view(WorkerView)
    _set_info(view, info)
    _set_load(view, load)
    _set_cached(view, num_cached_blocks)
    return view


def _views(
    views: tuple[WorkerView, ...],
    worker_ids: tuple[str, ...],
    cached: Mapping[str, int],
    touched: frozenset[str],
    inflight: InflightTable | None,
) -> list[WorkerView]:
    """`views` with their cached block counts and adjusted loads; others keep their view."""
    out = []
    for v, wid in zip(views, worker_ids):
        n = cached[wid]
        if wid in touched and inflight is not None:
            out.append(_view(v.info, inflight.adjust(wid, v.load), n))
        else:
            out.append(_view(v.info, v.load, n) if n else v)
    return out
