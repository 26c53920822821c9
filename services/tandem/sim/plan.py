"""`tandem plan`: the cheapest prefill/decode sizing that meets the SLOs, by simulation.

Search (DistServe's placement question, answered by running the simulator):
1. For n = 1, 2, ... workers up to the budget, simulate every split (P prefill, n - P decode;
   P = 0 is colocated serving: every prompt is prefilled on a decode worker). A configuration
   meets the SLOs when the share of requests with TTFT <= slo.ttft_s and ITL <= slo.itl_s is
   at least `attainment`. The cheapest is the smallest n with a split that meets them (ties:
   the higher attainment, then fewer prefill workers).
2. Colocated baseline: the smallest colocated n (0 prefill) within the budget that meets them.
3. Goodput (DistServe's definition): the highest request rate at which a configuration still
   meets the SLOs, found by compressing or stretching the trace's arrival times (doubling, then
   `rate_search_steps` bisection steps); reported per GPU. The gain is the planned
   configuration's goodput per GPU over the colocated baseline's.
4. Cost per million output tokens at that goodput: the configuration's GPUs x price per hour /
   3600 / output tokens per second x 1e6.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.results import SimResult, Slo
from tandem.sim.types import CostModel, TraceRequest


@dataclass(frozen=True)
class PlanSpec:
    """What `plan` searches for: the SLOs and their attainment target, the budget in GPUs,
    the GPUs per worker (tensor parallel) and their price per hour."""

    slo: Slo
    attainment: float = 0.9
    max_gpus: int = 8
    gpus_per_worker: int = 1
    gpu_cost_per_hour_usd: float = 1.0
    rate_search_steps: int = 6

    def __post_init__(self) -> None:
        if not 0.0 < self.attainment <= 1.0:
            raise ValueError(f"attainment is a fraction in (0, 1], got {self.attainment!r}")
        if self.gpus_per_worker < 1 or self.max_gpus < self.gpus_per_worker:
            raise ValueError(f"the budget ({self.max_gpus} GPUs) must hold one worker of {self.gpus_per_worker} GPUs")
        if self.gpu_cost_per_hour_usd < 0:
            raise ValueError(f"gpu_cost_per_hour_usd must be >= 0, got {self.gpu_cost_per_hour_usd!r}")

    @property
    def max_workers(self) -> int:
        return self.max_gpus // self.gpus_per_worker


@dataclass(frozen=True)
class Candidate:
    """One simulated configuration at the workload's own rate."""

    num_prefill: int
    num_decode: int
    attainment: float
    result: SimResult

    @property
    def num_workers(self) -> int:
        return self.num_prefill + self.num_decode

    @property
    def colocated(self) -> bool:
        return self.num_prefill == 0


@dataclass(frozen=True)
class Sizing:
    """A configuration with its goodput (the highest rate meeting the SLOs) and cost."""

    candidate: Candidate
    goodput_rps: float
    goodput_per_gpu: float
    cost_per_million_tokens_usd: float | None  # None when no output tokens were served


@dataclass(frozen=True)
class PlanResult:
    best: Sizing | None  # None: nothing within the budget meets the SLOs
    colocated: Sizing | None
    evaluated: tuple[Candidate, ...]  # every configuration simulated, in search order

    @property
    def gain(self) -> float | None:
        """Goodput per GPU of the plan over that of the colocated baseline."""
        if self.best is None or self.colocated is None or self.colocated.goodput_per_gpu == 0:
            return None
        return self.best.goodput_per_gpu / self.colocated.goodput_per_gpu


Simulate = Callable[[int, int, Sequence[TraceRequest]], SimResult]


def simulator(base: ClusterConfig, cost: CostModel) -> Simulate:
    """Runs `base` with the given pool sizes (and `base`'s SLO replaced by none: `plan` scores)."""

    def run(num_prefill: int, num_decode: int, trace: Sequence[TraceRequest]) -> SimResult:
        config = dataclasses.replace(base, num_prefill=num_prefill, num_decode=num_decode, autoscaler=None)
        return ClusterSim(config, cost, trace).run()

    return run


def plan(trace: Sequence[TraceRequest], spec: PlanSpec, simulate: Simulate) -> PlanResult:
    """The search of the module docstring. `simulate(P, D, trace)` runs one configuration
    whose `ClusterConfig.slo` is `spec.slo` (see `simulator`)."""
    evaluated: list[Candidate] = []

    def evaluate(num_prefill: int, num_decode: int) -> Candidate:
        result = simulate(num_prefill, num_decode, trace)
        attainment = result.attainment()
        if attainment is None:
            raise ValueError("plan needs results scored against its SLO: give the ClusterConfig spec.slo")
        candidate = Candidate(num_prefill, num_decode, attainment, result)
        evaluated.append(candidate)
        return candidate

    best = colocated = None
    for n in range(1, spec.max_workers + 1):
        splits = [evaluate(p, n - p) for p in range(n)]
        meeting = [c for c in splits if c.attainment >= spec.attainment]
        if colocated is None and splits[0].attainment >= spec.attainment:
            colocated = splits[0]
        if meeting and best is None:
            best = min(meeting, key=lambda c: (-c.attainment, c.num_prefill))
        if best is not None:
            break
    n = best.num_workers + 1 if best is not None else spec.max_workers + 1
    while colocated is None and n <= spec.max_workers:
        candidate = evaluate(0, n)
        if candidate.attainment >= spec.attainment:
            colocated = candidate
        n += 1
    return PlanResult(
        _sizing(best, trace, spec, simulate) if best is not None else None,
        _sizing(colocated, trace, spec, simulate) if colocated is not None else None,
        tuple(evaluated),
    )


def scaled(trace: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """`trace` at `factor` times its request rate (arrival times divided by `factor`)."""
    return [dataclasses.replace(r, arrival_s=r.arrival_s / factor) for r in trace]


def _meets(candidate: Candidate, trace: Sequence[TraceRequest], spec: PlanSpec, simulate: Simulate) -> bool:
    result = simulate(candidate.num_prefill, candidate.num_decode, trace)
    attainment = result.attainment()
    return attainment is not None and attainment >= spec.attainment


def _sizing(candidate: Candidate, trace: Sequence[TraceRequest], spec: PlanSpec, simulate: Simulate) -> Sizing:
    low, high = 1.0, 2.0  # rate factors: `low` meets the SLOs (the candidate does at 1)
    for _ in range(spec.rate_search_steps):
        if not _meets(candidate, scaled(trace, high), spec, simulate):
            break
        low, high = high, high * 2
    for _ in range(spec.rate_search_steps):
        mid = (low + high) / 2
        if _meets(candidate, scaled(trace, mid), spec, simulate):
            low = mid
        else:
            high = mid
    base = candidate.result
    rate_rps = base.requests_per_s * low
    gpus = candidate.num_workers * spec.gpus_per_worker
    tokens_per_s = base.output_tokens_per_s * low
    cost = None
    if tokens_per_s > 0:
        cost = gpus * spec.gpu_cost_per_hour_usd / 3600 / tokens_per_s * 1e6
    return Sizing(candidate, rate_rps, rate_rps / gpus, cost)
