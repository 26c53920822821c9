"""Reproduce DistServe's chatbot goodput gain in simulation (`sim/distserve.py` has the setup).

Per-GPU goodput, DistServe's metric: the highest Poisson rate at which `attainment` of the
requests meet both SLOs (TTFT, and TPOT: our ITL, a request's mean gap), divided by the GPUs.
The highest rate is found by doubling from 1 req/s, then bisecting `steps` times; each probe
simulates `num_requests` requests of `chatbot_trace` at that rate.

How each side is modelled is a `Variant`; `PAPER` (the default) follows the artifact, `BEFORE`
is this module's first version, kept to show what each change does:
- the baseline's planner: vLLM 0.1.7's (`legacy_vllm.py`: prompt-only steps that pause the
  running batch) or the project's batcher (mixed steps: a prompt joins the running decodes);
- engine limits: the artifact's (`2-start-api-server.py`: vLLM `--max-num-batched-tokens
  16384 --max-num-seqs 1024 --gpu-memory-utilization 0.95`; DistServe 8192 tokens per prefill
  batch, 1024 sequences) or the first version's 2048 tokens and 256 sequences, 90 % of memory;
- DistServe's placement: the artifact's for OPT-13B (one prefill instance of tensor parallelism
  2 and one decode instance of 1: 3 GPUs, `MODEL_TO_PARALLEL_PARAMS`), or the best
  prefill/decode split of `distserve_gpus` single-GPU workers;
- step times: the authors' measured A100 fits (`distserve_profile.py`; each engine its own) or
  the roofline (`costmodel.py`);
- prefill step times (with the measured fits): for the engines named in `calibrated_prefill`,
  calibrated on the real runs' lone prefills (`CALIBRATED_PREFILL`, where one exists for the
  engine and tensor-parallel degree); otherwise the artifact's realigned fits;
- the KV hand-off: over NVLink (OPT-13B's two instances share a node) or the project's default
  400 Gb/s NIC (the first version).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from tandem.scheduler.config import SchedulerConfig
from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.costmodel import DEFAULT_KV_LINK, RooflineCostModel
from tandem.sim.distserve import LengthSampler, PaperSetup, chatbot_trace
from tandem.sim.distserve_profile import (
    A100_NVLINK,
    CALIBRATED_PREFILL,
    DISTSERVE_OPT_13B,
    VLLM_OPT_13B,
    ProfileCostModel,
    StepFit,
)
from tandem.sim.legacy_vllm import LEGACY_VLLM
from tandem.sim.results import Slo
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import CostModel, TraceRequest

BLOCK_SIZE = 16  # both engines' --block-size in the artifact


@dataclass(frozen=True)
class Variant:
    """How the two sides are modelled (module docstring)."""

    baseline_planner: str = LEGACY_VLLM
    artifact_limits: bool = True
    artifact_placement: bool = True
    measured_costs: bool = True
    nvlink_handoff: bool = True
    calibrated_prefill: tuple[str, ...] = ("vllm", "distserve")


PAPER = Variant()
VLLM_CALIBRATED = Variant(calibrated_prefill=("vllm",))
ARTIFACT_FITS = Variant(calibrated_prefill=())
BEFORE = Variant("batcher", False, False, False, False, ())


@dataclass(frozen=True)
class Reproduction:
    vllm_goodput_per_gpu: float
    distserve_goodput_per_gpu: float
    distserve_split: tuple[int, int]  # (prefill, decode) workers
    distserve_gpus: int

    @property
    def gain(self) -> float:
        """DistServe's per-GPU goodput over vLLM's; inf when vLLM met the attainment at no rate
        searched (its goodput is 0) and DistServe did."""
        if self.vllm_goodput_per_gpu == 0:
            return math.inf if self.distserve_goodput_per_gpu > 0 else math.nan
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


def cost_models(setup: PaperSetup, variant: Variant, prefill_tp: int) -> tuple[CostModel, CostModel, CostModel]:
    """(vLLM's worker, DistServe's prefill worker of `prefill_tp` GPUs, DistServe's decode worker)."""
    if variant.measured_costs:
        if setup.model.name != "opt-13b":
            raise ValueError(f"the artifact's measured step fits cover opt-13b only, not {setup.model.name}")
        model = setup.model

        def fit(engine: str, fits: Mapping[int, StepFit], tp: int) -> StepFit:
            prefill = CALIBRATED_PREFILL.get((engine, tp)) if engine in variant.calibrated_prefill else None
            return fits[tp] if prefill is None else replace(fits[tp], prefill=prefill)

        return (
            ProfileCostModel(model, fit("vllm", VLLM_OPT_13B, 1)),
            ProfileCostModel(model, fit("distserve", DISTSERVE_OPT_13B, prefill_tp)),
            ProfileCostModel(model, DISTSERVE_OPT_13B[1]),
        )
    link = A100_NVLINK if variant.nvlink_handoff else DEFAULT_KV_LINK
    one = RooflineCostModel(setup.model, setup.gpu, kv_link=link, tp_link=A100_NVLINK)
    return one, replace(one, tp=prefill_tp), one


@dataclass(frozen=True)
class Deployment:
    """One side of the comparison as the simulator runs it."""

    config: ClusterConfig
    cost: CostModel  # every step but the prefill workers', and the KV hand-offs
    prefill_cost: CostModel | None
    gpus: int

    def simulate(self, trace: Sequence[TraceRequest]) -> ClusterSim:
        sim = ClusterSim(self.config, self.cost, trace, prefill_cost=self.prefill_cost)
        sim.run()
        return sim


def deployments(setup: PaperSetup, variant: Variant = PAPER) -> tuple[Deployment, list[Deployment]]:
    """vLLM's deployment, and DistServe's: the artifact's placement, or every prefill/decode
    split of `setup.distserve_gpus` single-GPU workers."""
    prefill_tp = setup.distserve_prefill_tp if variant.artifact_placement else 1
    vllm_cost, prefill_cost, decode_cost = cost_models(setup, variant, prefill_tp)
    memory = 0.95 if variant.artifact_limits else 0.9
    num_blocks = RooflineCostModel(setup.model, setup.gpu).kv_capacity_tokens(memory) // BLOCK_SIZE
    vllm_step = StepModelConfig(
        BLOCK_SIZE, 16384 if variant.artifact_limits else 2048, 1024 if variant.artifact_limits else 256,
        None, num_blocks, variant.baseline_planner,
    )  # fmt: skip
    distserve_step = StepModelConfig(
        BLOCK_SIZE, 8192 if variant.artifact_limits else 2048, 1024 if variant.artifact_limits else 256,
        None, num_blocks,
    )  # fmt: skip
    slo = Slo(setup.ttft_slo_s, setup.tpot_slo_s)
    # every prompt goes to the prefill pool when there is one (DistServe disaggregates all)
    scheduler = SchedulerConfig(local_prefill_max_tokens=0)
    vllm = Deployment(
        ClusterConfig(0, setup.vllm_gpus, vllm_step, scheduler, slo=slo), vllm_cost, None, setup.vllm_gpus
    )
    if variant.artifact_placement:
        splits = [(1, 1)]
        gpus = setup.distserve_prefill_tp + setup.distserve_decode_tp
    else:
        splits = [(p, setup.distserve_gpus - p) for p in range(1, setup.distserve_gpus)]
        gpus = setup.distserve_gpus
    distserve = [
        Deployment(ClusterConfig(*split, distserve_step, scheduler, slo=slo), decode_cost, prefill_cost, gpus)
        for split in splits
    ]
    return vllm, distserve


def reproduce(
    setup: PaperSetup,
    lengths: LengthSampler | None = None,
    num_requests: int = 400,
    seed: int = 0,
    steps: int = 7,
    variant: Variant = PAPER,
) -> Reproduction:
    """Per-GPU goodput of both sides on `chatbot_trace(num_requests, rate, seed, lengths)`
    (default lengths: the artifact's, `artifact_lengths`)."""

    def goodput(deployment: Deployment) -> float:
        def meets(rate_rps: float) -> bool:
            trace = chatbot_trace(num_requests, rate_rps, seed, lengths)
            attainment = deployment.simulate(trace).records.num_good(slo) / num_requests if trace else 0.0
            return attainment >= setup.attainment

        return max_rate(meets, 1.0, steps) / deployment.gpus

    slo = Slo(setup.ttft_slo_s, setup.tpot_slo_s)
    vllm, distserve = deployments(setup, variant)
    per_split = {(d.config.num_prefill, d.config.num_decode): (goodput(d), d.gpus) for d in distserve}
    best = max(per_split, key=lambda split: (per_split[split][0], -split[0]))
    return Reproduction(goodput(vllm), per_split[best][0], best, per_split[best][1])
