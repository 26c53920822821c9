"""DistServe's published chatbot setup and the length samplers that stand in for ShareGPT."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.sim.distserve import (
    CHATBOT_OPT_13B,
    MAX_TOTAL_TOKENS,
    EmpiricalLengths,
    LogNormalLengths,
    _kept,
    artifact_lengths,
    chatbot_trace,
)
from tandem.sim.types import TraceRequest


def test_the_published_setup() -> None:
    setup = CHATBOT_OPT_13B
    assert (setup.model.name, setup.gpu.name, setup.dataset) == ("opt-13b", "A100", "ShareGPT")
    assert (setup.ttft_slo_s, setup.tpot_slo_s, setup.attainment) == (0.25, 0.1, 0.9)
    assert setup.gain_vs_vllm == (2.0, 4.6)
    assert (setup.distserve_gpus, setup.vllm_gpus) == (3, 1)
    assert "Table 1" in setup.source and "section 6.2" in setup.source


def test_lognormal_lengths_pass_the_artifact_filter_and_are_deterministic() -> None:
    sampler = LogNormalLengths()
    pairs = sampler.sample(np.random.default_rng(0), 5000)
    assert len(pairs) == 5000
    assert all(p >= 1 and o >= 1 and p + o < MAX_TOTAL_TOKENS for p, o in pairs)
    assert not any(p < 4 and o < 4 for p, o in pairs)
    assert pairs == sampler.sample(np.random.default_rng(0), 5000)
    # the filter truncates the tail: the kept medians sit a little under the assumed 400 / 150
    assert 300 < float(np.median([p for p, _ in pairs])) < 400
    assert 120 < float(np.median([o for _, o in pairs])) < 150


def test_empirical_lengths_replay_the_given_pairs() -> None:
    pairs = ((10, 20), (300, 40), (1000, 900))
    drawn = EmpiricalLengths(pairs).sample(np.random.default_rng(1), 100)
    assert set(drawn) == set(pairs)
    with pytest.raises(ValueError, match=r"prompt \+ output < 2048\); got \[\(1500, 600\)\]$"):
        EmpiricalLengths(((1500, 600),))
    with pytest.raises(ValueError, match="at least one"):
        EmpiricalLengths(())


def test_chatbot_trace_has_poisson_arrivals_at_the_rate() -> None:
    trace = chatbot_trace(4000, rate_rps=2.0, seed=3)
    assert trace == chatbot_trace(4000, rate_rps=2.0, seed=3)
    assert trace[0].arrival_s == 0.0
    gaps = np.diff([r.arrival_s for r in trace])
    assert (gaps >= 0).all() and abs(float(gaps.mean()) - 0.5) < 0.05
    assert all(r.prefix_group is None and r.prefix_tokens == 0 for r in trace)
    assert chatbot_trace(1, 1.0, 0, EmpiricalLengths(((7, 9),))) == (TraceRequest(0.0, 7, 9),)
    with pytest.raises(ValueError, match="rate_rps must be a positive number, got 0.0"):
        chatbot_trace(3, 0.0, 0)


def test_artifact_lengths_are_the_authors_1600_requests() -> None:
    lengths = artifact_lengths()
    assert len(lengths.pairs) == 1600
    assert len(set(lengths.pairs)) == 1593  # a few distinct requests share their lengths
    # the first and last requests of distserve-c21d12-1600-16.exp, in issue order
    assert lengths.pairs[:4] == ((55, 4), (829, 170), (697, 431), (1316, 9))
    assert lengths.pairs[-3:] == ((846, 908), (394, 469), (678, 364))
    assert sum(p for p, _ in lengths.pairs) == 1_213_930
    assert sum(o for _, o in lengths.pairs) == 298_116
    assert all(_kept(p, o) and min(p, o) >= 1 for p, o in lengths.pairs)
    assert max(p for p, _ in lengths.pairs) == 2031
    assert sum(p >= 1000 for p, _ in lengths.pairs) == 525
    assert chatbot_trace(3, 1.0, 5) == chatbot_trace(3, 1.0, 5, lengths)
