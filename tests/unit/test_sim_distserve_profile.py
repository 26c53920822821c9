"""The cost model priced by DistServe's measured A100 step fits, against hand-computed steps."""

from __future__ import annotations

import pytest

from tandem.sim.costmodel import MODELS
from tandem.sim.distserve_profile import (
    A100_NVLINK,
    DISTSERVE_OPT_13B,
    VLLM_OPT_13B,
    ProfileCostModel,
    StepFit,
)
from tandem.sim.types import StepShape

TOY = StepFit(
    prefill=(10.0, 0.1, 0.001), decode_small=(20.0, 0.01, 1.0), decode_large=(5.0, 0.01, 2.0), large_batch_from=3
)
OPT = MODELS["opt-13b"]


def test_prefill_step_is_the_fit_over_whole_prompts_plus_ray() -> None:
    cost = ProfileCostModel(OPT, TOY)
    # prompts of 10 and 20 tokens: contexts 55 + 210, squares 100 + 400
    step = StepShape(prefill_tokens=30, prefill_context_tokens=265)
    # 10 + 0.1 x 30 + 0.001 x 500 + 2 + 1e-4 x 30 ms
    assert cost.step_seconds(step) == pytest.approx(15.503e-3, rel=1e-12)


def test_decode_step_uses_the_small_or_large_batch_fit() -> None:
    cost = ProfileCostModel(OPT, TOY)
    # 2 < 3 sequences: 20 + 0.01 x 1000 + 1 x 2, then 2 + 1e-4 x 1000 ms
    assert cost.step_seconds(StepShape(decode_seqs=2, decode_context_tokens=1000)) == pytest.approx(34.1e-3, rel=1e-12)
    # 3 sequences: 5 + 0.01 x 1000 + 2 x 3, then 2.1 ms
    assert cost.step_seconds(StepShape(decode_seqs=3, decode_context_tokens=1000)) == pytest.approx(23.1e-3, rel=1e-12)


def test_mixed_step_adds_the_prefill_terms_without_their_intercept() -> None:
    cost = ProfileCostModel(OPT, TOY)
    step = StepShape(prefill_tokens=4, prefill_context_tokens=10, decode_seqs=2, decode_context_tokens=1000)
    # 32 (decode) + 0.1 x 4 + 0.001 x 16, then 2 + 1e-4 x 1004 ms
    assert cost.step_seconds(step) == pytest.approx(34.5164e-3, rel=1e-12)
    assert cost.step_seconds(StepShape()) == 0.0


def test_published_fits_and_the_link() -> None:
    assert sorted(VLLM_OPT_13B) == sorted(DISTSERVE_OPT_13B) == [1, 2, 4]
    # vLLM, tp 1, one 400-token prompt: 22.052 + 0.14051 x 400 + 8.0766e-6 x 160000 + 2.04 ms
    cost = ProfileCostModel(OPT, VLLM_OPT_13B[1])
    assert cost.step_seconds(StepShape(400, 400 * 401 // 2)) == pytest.approx(81.588e-3, abs=1e-6)
    assert cost.kv_bytes_per_token() == 2 * 40 * 5120 * 2
    assert cost.transfer_seconds(300_000_000) == pytest.approx(1e-3 + A100_NVLINK.latency_s)
    assert A100_NVLINK.bandwidth == 300e9
