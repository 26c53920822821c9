"""The DistServe reproduction's plumbing: the rate search, the variants' cost models and
placement, and per-role step costs in the cluster simulation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tandem.scheduler.config import SchedulerConfig
from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.costmodel import DEFAULT_KV_LINK, MODELS, RooflineCostModel
from tandem.sim.distserve import CHATBOT_OPT_13B, EmpiricalLengths
from tandem.sim.distserve_profile import (
    A100_NVLINK,
    CALIBRATED_PREFILL,
    DISTSERVE_OPT_13B,
    VLLM_OPT_13B,
    ProfileCostModel,
)
from tandem.sim.paper import (
    ARTIFACT_FITS,
    BEFORE,
    PAPER,
    VLLM_CALIBRATED,
    Reproduction,
    Variant,
    cost_models,
    max_rate,
    reproduce,
)
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import TraceRequest
from tests.unit.sim_doubles import StepCost


def test_max_rate_doubles_then_bisects() -> None:
    probes: list[float] = []

    def meets(rate: float) -> bool:
        probes.append(rate)
        return rate <= 5.3

    assert max_rate(meets, 1.0, 3) == 5.0
    assert probes == [1.0, 2.0, 4.0, 8.0, 6.0, 5.0, 5.5]
    assert max_rate(lambda rate: rate <= 0.3, 1.0, 2) == 0.25


def test_the_variants() -> None:
    assert Variant("vllm-0.1.7", True, True, True, True, ("vllm", "distserve")) == PAPER
    assert Variant("vllm-0.1.7", True, True, True, True, ("vllm",)) == VLLM_CALIBRATED
    assert Variant("vllm-0.1.7", True, True, True, True, ()) == ARTIFACT_FITS
    assert Variant("batcher", False, False, False, False, ()) == BEFORE
    assert (CHATBOT_OPT_13B.distserve_prefill_tp, CHATBOT_OPT_13B.distserve_decode_tp) == (2, 1)
    opt = MODELS["opt-13b"]
    # the default: both engines' prefill fits calibrated on the real runs, the rest the artifact's
    vllm, prefill, decode = cost_models(CHATBOT_OPT_13B, PAPER, 2)
    assert vllm == ProfileCostModel(opt, replace(VLLM_OPT_13B[1], prefill=CALIBRATED_PREFILL[("vllm", 1)]))
    assert (prefill, decode) == (
        ProfileCostModel(opt, replace(DISTSERVE_OPT_13B[2], prefill=CALIBRATED_PREFILL[("distserve", 2)])),
        ProfileCostModel(opt, DISTSERVE_OPT_13B[1]),
    )
    # no calibrated fit for a 1-GPU prefill instance: the artifact's
    assert cost_models(CHATBOT_OPT_13B, PAPER, 1)[1] == ProfileCostModel(opt, DISTSERVE_OPT_13B[1])
    vllm, prefill, decode = cost_models(CHATBOT_OPT_13B, VLLM_CALIBRATED, 2)
    assert vllm == ProfileCostModel(opt, replace(VLLM_OPT_13B[1], prefill=CALIBRATED_PREFILL[("vllm", 1)]))
    assert prefill == ProfileCostModel(opt, DISTSERVE_OPT_13B[2])
    vllm, prefill, decode = cost_models(CHATBOT_OPT_13B, ARTIFACT_FITS, 2)
    assert vllm == ProfileCostModel(opt, VLLM_OPT_13B[1])
    assert (prefill, decode) == (
        ProfileCostModel(opt, DISTSERVE_OPT_13B[2]),
        ProfileCostModel(opt, DISTSERVE_OPT_13B[1]),
    )
    roofline = Variant(measured_costs=False)
    vllm, prefill, decode = cost_models(CHATBOT_OPT_13B, roofline, 2)
    assert isinstance(prefill, RooflineCostModel) and (prefill.tp, prefill.kv_link) == (2, A100_NVLINK)
    vllm, prefill, decode = cost_models(CHATBOT_OPT_13B, BEFORE, 1)
    assert isinstance(vllm, RooflineCostModel) and (vllm.tp, vllm.kv_link) == (1, DEFAULT_KV_LINK)
    setup = CHATBOT_OPT_13B.__class__(**{**CHATBOT_OPT_13B.__dict__, "model": MODELS["opt-66b"]})
    with pytest.raises(ValueError, match="^the artifact's measured step fits cover opt-13b only, not opt-66b$"):
        cost_models(setup, PAPER, 2)


def test_prefill_workers_take_their_own_cost() -> None:
    """One request, prompt 10, 3 output tokens, 1P + 1D: the prefill step takes the prefill
    cost (1 s: the TTFT); the decode worker's two steps take 0.01 s each."""
    config = ClusterConfig(1, 1, StepModelConfig(num_blocks=100), SchedulerConfig(local_prefill_max_tokens=0))
    trace = [TraceRequest(0.0, 10, 3)]
    sim = ClusterSim(config, StepCost(0.01), trace, prefill_cost=StepCost(1.0))
    sim.run()
    assert (sim.records.first_token_s[0], sim.records.finish_s[0]) == (1.0, pytest.approx(1.02))
    sim = ClusterSim(config, StepCost(0.01), trace)
    sim.run()
    assert (sim.records.first_token_s[0], sim.records.finish_s[0]) == (0.01, pytest.approx(0.03))


def test_reproduce_runs_the_artifact_placement_deterministically() -> None:
    lengths = EmpiricalLengths(((200, 50), (600, 120), (1200, 300)))
    first = reproduce(CHATBOT_OPT_13B, lengths, num_requests=60, seed=2, steps=3)
    assert (first.distserve_split, first.distserve_gpus) == ((1, 1), 3)
    assert first == reproduce(CHATBOT_OPT_13B, lengths, num_requests=60, seed=2, steps=3)
    assert first.vllm_goodput_per_gpu > 0 and first.distserve_goodput_per_gpu > 0
    searched = reproduce(CHATBOT_OPT_13B, lengths, num_requests=60, seed=2, steps=3, variant=BEFORE)
    assert searched.distserve_gpus == 3 and sum(searched.distserve_split) == 3


def test_gain_when_vllm_meets_the_attainment_at_no_rate() -> None:
    assert Reproduction(0.5, 1.5, (1, 1), 3).gain == 3.0
    assert Reproduction(0.0, 1.5, (1, 1), 3).gain == math.inf
    assert math.isnan(Reproduction(0.0, 0.0, (1, 1), 3).gain)
