"""The routing decision: (request, worker views) -> (P, D) pair. Pure; no I/O, no clock.

Caller: `Scheduler.route` (with views built from its registry snapshot and prefix index), the
bench, and tests / simulators with hand-made views. Nothing here is mutated.

Rules, in order:
1. Drop the views whose worker id is in `exclude` (the gateway retries elsewhere after a
   failure).
2. Pick the decode worker D with the policy among all remaining decode views; none left raises
   `NoWorkerError`.
3. The prefill candidates are the remaining prefill views whose layout fingerprint equals D's
   (KV is never paired across fingerprints).
4. If there are none, or D's uncached tokens (prompt tokens minus the leading blocks D holds)
   are < `local_prefill_max_tokens`, the answer is LOCAL_PREFILL: D prefills itself.
5. Otherwise pick P with the policy among the candidates: DISAGGREGATED.

Why D is chosen among ALL decode workers, not only among those with a compatible prefill
worker: D holds the sequence for its whole life, so its cache hits and load matter more than
where the prompt is computed; and the prefix-aware decode cost already charges the uncached
tokens D may have to prefill itself. Restricting D would starve a decode group whose
fingerprint has no prefill pool (e.g. colocated workers, or the old half of a rolling
upgrade), and would push a request away from a D that holds its whole prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.common.workers import WorkerRole
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.policies import Policy
from tandem.scheduler.types import (
    NoWorkerError,
    RouteDecision,
    RouteKind,
    RouteRequest,
    WorkerView,
)


def cached_tokens(request: RouteRequest, view: WorkerView, config: SchedulerConfig) -> int:
    """Prompt tokens in the leading blocks `view` holds (never more than the prompt)."""
    return min(request.num_prompt_tokens, view.num_cached_blocks * config.block_size)


def decide(
    request: RouteRequest,
    prefill: Sequence[WorkerView],
    decode: Sequence[WorkerView],
    policy: Policy,
    config: SchedulerConfig,
    exclude: frozenset[str] = frozenset(),
) -> RouteDecision:
    """Pick (P, D) or D alone for `request`; see the module docstring for the rules.

    Raises ValueError if the request's block hashes do not match `config.block_size`
    (gateway and scheduler disagree on the block size), NoWorkerError if no decode worker
    is left after `exclude`.
    """
    expected_blocks = request.num_prompt_tokens // config.block_size
    if len(request.block_hashes) != expected_blocks:
        raise ValueError(
            f"request {request.request_id}: {len(request.block_hashes)} block hashes for "
            f"{request.num_prompt_tokens} tokens, expected {expected_blocks} at block_size "
            f"{config.block_size}; hash with the workers' block size"
        )
    decode_views = [v for v in decode if v.info.worker_id not in exclude] if exclude else decode
    if not decode_views:
        raise NoWorkerError(
            f"no routable decode worker for request {request.request_id} "
            f"({len(decode)} live, {len(decode) - len(decode_views)} excluded)"
        )
    d = policy.pick(request, decode_views, WorkerRole.DECODE, config)
    decode_cached = cached_tokens(request, d, config)
    uncached_at_d = request.num_prompt_tokens - decode_cached
    fingerprint = d.info.fingerprint
    candidates = [v for v in prefill if v.info.fingerprint == fingerprint and v.info.worker_id not in exclude]
    if not candidates or uncached_at_d < config.local_prefill_max_tokens:
        return RouteDecision(RouteKind.LOCAL_PREFILL, d.info, None, decode_cached, 0)
    p = policy.pick(request, candidates, WorkerRole.PREFILL, config)
    return RouteDecision(RouteKind.DISAGGREGATED, d.info, p.info, decode_cached, cached_tokens(request, p, config))
