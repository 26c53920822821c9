"""Reproduce DistServe's chatbot goodput gain in simulation (`sim/distserve.py` has the setup).

Per-GPU goodput, DistServe's metric: the highest Poisson rate at which `attainment` of the
requests meet both SLOs (TTFT, and TPOT: our ITL, a request's mean gap), divided by the GPUs.
- vLLM (the paper's baseline): one colocated worker on one GPU, continuous batching with no
  chunked prefill and a 2048-token step budget (OPT's context).
- DistServe: `distserve_gpus` workers, one GPU each, split into prefill and decode; every split
  is simulated and the best is kept (the paper's placement search, restricted to tp = 1).
The highest rate is found by doubling from `start_rps`, then bisecting `steps` times; each
probe simulates `num_requests` requests of `chatbot_trace` at that rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tandem.scheduler.config import SchedulerConfig
from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.costmodel import RooflineCostModel
from tandem.sim.distserve import LengthSampler, PaperSetup, chatbot_trace
from tandem.sim.results import Slo
from tandem.sim.stepmodel import StepModelConfig

BUDGET_TOKENS = 2048


@dataclass(frozen=True)
class Reproduction:
    vllm_goodput_per_gpu: float
    distserve_goodput_per_gpu: float
    distserve_split: tuple[int, int]  # (prefill, decode) workers

    @property
    def gain(self) -> float:
        return self.distserve_goodput_per_gpu / self.vllm_goodput_per_gpu


def max_rate(meets: Callable[[float], bool], start_rps: float, steps: int) -> float:
    """The highest rate at which `meets` holds, within start_rps / 2**steps (0: not even
    at start_rps / 2**steps)."""
    low, high = 0.0, start_rps
    if meets(start_rps):
        low, high = start_rps, 2 * start_rps
        for _ in range(steps):
            if not meets(high):
                break
            low, high = high, 2 * high
    for _ in range(steps):
        mid = (low + high) / 2
        if meets(mid):
            low = mid
        else:
            high = mid
    return low


def reproduce(
    setup: PaperSetup,
    lengths: LengthSampler | None = None,
    num_requests: int = 400,
    seed: int = 0,
    steps: int = 7,
) -> Reproduction:
    cost = RooflineCostModel(setup.model, setup.gpu)
    step = StepModelConfig(16, BUDGET_TOKENS, 256, None, cost.kv_capacity_tokens() // 16)
    slo = Slo(setup.ttft_slo_s, setup.tpot_slo_s)

    def goodput(num_prefill: int, num_decode: int) -> float:
        # every prompt goes to the prefill pool when there is one (DistServe disaggregates all)
        scheduler = SchedulerConfig(local_prefill_max_tokens=0)
        config = ClusterConfig(num_prefill, num_decode, step, scheduler, slo=slo)

        def meets(rate_rps: float) -> bool:
            result = ClusterSim(config, cost, chatbot_trace(num_requests, rate_rps, seed, lengths)).run()
            attainment = result.attainment()
            return attainment is not None and attainment >= setup.attainment

        return max_rate(meets, 1.0, steps) / (num_prefill + num_decode)

    vllm = goodput(0, setup.vllm_gpus)
    per_split = {(p, setup.distserve_gpus - p): 0.0 for p in range(1, setup.distserve_gpus)}
    for split in per_split:
        per_split[split] = goodput(*split)
    best = max(per_split, key=lambda split: (per_split[split], -split[0]))
    return Reproduction(vllm, per_split[best], best)
