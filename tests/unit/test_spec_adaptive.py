"""Acceptance-aware speculation (engine/spec/adaptive.py): the acceptance estimate, the cost
fit, the k chosen for a scripted acceptance sequence, and the probe schedule."""

from __future__ import annotations

import pytest

from tandem.common.request import Request, SamplingParams
from tandem.engine.sequence import Sequence
from tandem.engine.spec.adaptive import (
    MAX_BACKOFF_INTERVAL_STEPS,
    MIN_COST_SAMPLES,
    Costs,
    ProbeSchedule,
    StepCosts,
    choose_k,
    expected_tokens,
    probe_interval,
    update_acceptance,
)
from tandem.engine.spec.config import SpeculativeConfig
from tandem.engine.spec.ngram import NgramProposer
from tandem.engine.spec.speculator import AdaptiveCounters, Speculator

GREEDY = SamplingParams(max_tokens=1000, temperature=0.0)
# a = 10 ms per pass, b = 1 ms per token, no drafting cost
NGRAM_COSTS = Costs(0.010, 0.001, 0.0)


def test_acceptance_estimate_counts_the_rejected_position_as_a_trial() -> None:
    assert update_acceptance(None, 4, 1) == 0.5  # 1 accepted, 1 rejected
    assert update_acceptance(None, 4, 4) == 1.0  # no rejection: every trial accepted
    assert update_acceptance(0.5, 4, 4) == 0.75
    assert update_acceptance(0.75, 2, 0) == 0.375
    assert expected_tokens(0.5, 3) == 1.875
    assert expected_tokens(0.0, 4) == 1.0


@pytest.mark.parametrize(
    ("acceptance", "costs", "batch_size", "k"),
    [
        (None, NGRAM_COSTS, 1, 4),  # no draft verified yet: k_max
        (1.0, NGRAM_COSTS, 1, 4),
        (0.5, NGRAM_COSTS, 1, 2),  # 1.75 * 11/13 = 1.481 beats k=3: 1.875 * 11/14 = 1.473
        (0.2, NGRAM_COSTS, 1, 1),  # 1.2 * 11/12 = 1.1
        (0.05, NGRAM_COSTS, 1, 0),  # 1.05 * 11/12 = 0.9625 < 1
        (0.5, NGRAM_COSTS, 8, 1),  # share 2.25 ms: 1.5 * 2.25/3.25 = 1.04; k=2: 1.75 * 2.25/4.25 = 0.93
        (0.4, NGRAM_COSTS, 8, 0),  # 1.4 * 2.25/3.25 = 0.97
        (0.5, Costs(0.010, 0.001, 0.010), 1, 0),  # a draft model at 11 ms per token: 1.5 * 11/22 < 1
        (0.95, Costs(0.010, 0.001, 0.002), 1, 4),  # 4.52 * 11/23 = 2.16
        (0.3, None, 1, 4),  # no cost model: the fixed floor LOW_ACCEPTANCE = 0.25
        (0.2, None, 1, 0),
    ],
)
def test_choose_k_table(acceptance: float | None, costs: Costs | None, batch_size: int, k: int) -> None:
    assert choose_k(acceptance, 4, costs, batch_size) == k


def test_choose_k_never_exceeds_k_max() -> None:
    assert choose_k(1.0, 2, NGRAM_COSTS, 1) == 2
    assert choose_k(1.0, 0, NGRAM_COSTS, 1) == 0


def _gaps(probes: ProbeSchedule, first_interval: int, num_probes: int) -> list[int]:
    """The steps skipped before each of the next `num_probes` probes (every probe unpaid)."""
    gaps, run = [], 0
    while len(gaps) < num_probes:
        if probes.skip(first_interval):
            run += 1
        else:
            gaps.append(run)
            run = 0
    return gaps


def test_probe_schedule_doubles_the_interval_after_each_probe_that_did_not_pay() -> None:
    probes = ProbeSchedule()
    assert [probes.skip(3) for _ in range(4)] == [True, True, True, False]  # the first interval: as given
    # each later call at k = 0 means the probe did not pay: 6, then 12 skipped steps
    assert [probes.skip(3) for _ in range(6 + 1 + 12 + 1)] == [True] * 6 + [False] + [True] * 12 + [False]
    assert (probes.doublings, probes.skipped) == (2, 0)
    # a step at k >= 1 (a paying probe) resets it to the first interval
    probes.drafted()
    assert _gaps(probes, 3, 4) == [3, 6, 12, 24]


def test_probe_schedule_backoff_stops_at_its_bound() -> None:
    assert MAX_BACKOFF_INTERVAL_STEPS == 512
    assert _gaps(ProbeSchedule(), 100, 6) == [100, 200, 400, 512, 512, 512]
    assert _gaps(ProbeSchedule(), 8, 9) == [8, 16, 32, 64, 128, 256, 512, 512, 512]
    # a first interval above the bound (never from `probe_interval`) is kept, not doubled
    assert _gaps(ProbeSchedule(), 600, 2) == [600, 600]


def test_probe_schedule_follows_the_first_interval_it_is_given() -> None:
    """The cost-share interval may change between steps (the batch size, the fit): the
    back-off doubles whatever the caller passes."""
    probes = ProbeSchedule()
    assert _gaps(probes, 4, 2) == [4, 8]
    assert _gaps(probes, 10, 1) == [40]  # two unpaid probes so far: 10 * 4


@pytest.mark.parametrize(
    ("costs", "batch_size", "interval"),
    [
        (None, 1, 8),
        (NGRAM_COSTS, 1, 8),  # 4 * 1 / (0.05 * 11) = 7.3
        (NGRAM_COSTS, 8, 36),  # 4 * 1 / (0.05 * 2.25) = 35.6
        (Costs(0.010, 0.001, 0.002), 1, 22),  # 4 * 3 / (0.05 * 11) = 21.8
        (Costs(0.010, 0.001, 0.010), 1, 64),  # 80, capped
    ],
)
def test_probe_interval_keeps_probes_near_five_percent_of_the_cost(
    costs: Costs | None, batch_size: int, interval: int
) -> None:
    assert probe_interval(4, costs, batch_size) == interval


def test_step_costs_fit_the_pass_times_exactly() -> None:
    costs = StepCosts()
    sizes = [1, 5, 300, 1, 5, 5, 120, 1, 5, 5, 5, 1, 5, 64, 5, 5]
    assert len(sizes) == MIN_COST_SAMPLES
    for n in sizes[:-1]:
        costs.observe_pass(n, 0.010 + 0.001 * n)
    assert costs.costs() is None  # one step short of MIN_COST_SAMPLES
    costs.observe_pass(sizes[-1], 0.010 + 0.001 * sizes[-1])
    costs.observe_draft(4, 0.004)
    costs.observe_draft(2, 0.0)  # EMA: 0.001 + 0.1 * (0 - 0.001)
    fitted = costs.costs()
    assert fitted is not None
    assert fitted.fixed_s == pytest.approx(0.010, abs=1e-12)
    assert fitted.per_token_s == pytest.approx(0.001, abs=1e-12)
    assert fitted.draft_token_s == pytest.approx(0.0009, abs=1e-12)


def test_step_costs_need_passes_of_different_sizes() -> None:
    costs = StepCosts()
    for _ in range(MIN_COST_SAMPLES + 4):
        costs.observe_pass(5, 0.015)
    assert costs.costs() is None  # a and b cannot be told apart


def _speculator_with_costs() -> Speculator:
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2}')
    spec = Speculator(config, NgramProposer(2, 2), max_num_batched_tokens=256)
    for n in [1, 5, 300, 1, 5, 5, 120, 1, 5, 5, 5, 1, 5, 64, 5, 5]:
        spec.costs.observe_pass(n, 0.010 + 0.001 * n)
    return spec


def _running(sampling: SamplingParams = GREEDY) -> Sequence:
    seq = Sequence(Request("r", (5, 6, 7, 8), sampling), b"", 4096)
    seq.token_ids.append(9)  # its first generated token
    seq.num_computed_tokens = seq.num_tokens - 1
    return seq


def test_scripted_acceptance_sets_each_steps_k() -> None:
    spec = _speculator_with_costs()
    seq = _running()
    # (drafted, accepted) of each verified draft; the k chosen before each
    script = [(4, 4), (4, 4), (4, 1), (2, 0), (1, 0), (4, 0), (1, 0)]
    ks = []
    for drafted, accepted in script:
        assert spec.skip_step(1, 1) is False
        ks.append(spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100))
        seq.spec_acceptance = update_acceptance(seq.spec_acceptance, drafted, accepted)
    # acceptance before each: None, 1.0, 1.0, 0.75, 0.375, 0.1875, 0.09375 (k = 1 pays above 1/11)
    assert ks == [4, 4, 4, 4, 2, 1, 1]
    # after the last: 0.046875 -> k = 0 for 8 steps, then a probe of k_max
    assert seq.spec_acceptance == 0.046875
    ks = [spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100) for _ in range(10)]
    assert ks == [0] * 8 + [4, 0]
    assert spec.counters == AdaptiveCounters(withheld_tokens=2 + 3 + 3 + 9 * 4, skipped_steps=9, probes=1)
    # the budget caps k_max before the rule: a probe drafts the capped k_max
    assert spec.num_draft_tokens(seq, False, budget_left=2, free_positions=100) == 0


def test_a_seeded_sampled_request_ignores_the_timings() -> None:
    spec = _speculator_with_costs()
    seq = _running(SamplingParams(max_tokens=1000, temperature=0.8, seed=7))
    seq.spec_acceptance = 0.3  # the cost model (at B = 1) would say 1; the fixed floor says k_max
    assert spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100) == 4
    seq.spec_acceptance = 0.2
    assert spec.num_draft_tokens(seq, True, budget_left=0, free_positions=0) == 0


def test_scripted_probe_outcomes_set_the_probe_schedule() -> None:
    """The speculator end to end on a request at k = 0: each drafting step's outcome goes into
    the acceptance estimate as the engine's verification does; unpaid probes double the
    interval (8 at B = 1 with these costs, `test_probe_interval_...`), a paying one resets it."""
    spec = _speculator_with_costs()
    seq = _running()
    seq.spec_acceptance = 0.0
    # three unpaid probes after 8, 16 and 32 skipped steps; the fourth, after 64, accepts all 4
    # (acceptance 0.5: k = 2); 0 of 2 leaves 0.25 (k = 1), 0 of 1 0.125 (k = 1), 0 of 1 0.0625
    # (k = 0): the first interval again, doubled after the next unpaid probe
    expected = "".join("0" * gap + "4" for gap in (8, 16, 32, 64)) + "211" + "0" * 8 + "4" + "0" * 16 + "4" + "000"
    outcomes = iter([0, 0, 0, 4, 0, 0, 0, 0, 0])  # accepted tokens of each drafting step, in order
    steps = ""
    for _ in expected:
        k = spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100)
        steps += str(k)
        if k:
            seq.spec_acceptance = update_acceptance(seq.spec_acceptance, k, min(next(outcomes), k))
    assert steps == expected
    assert spec.counters.probes == 6
    assert next(outcomes, None) is None


def test_choose_k_stops_at_the_scores_first_fall_without_missing_the_best_k() -> None:
    """The early stop (the score is unimodal in k) against the full scan over a grid: the same
    k, or one of exactly the same score up to rounding (p = 1 with b + q = a / B + b)."""

    def score(p: float, k: int, costs: Costs, batch_size: int) -> float:
        share = costs.fixed_s / batch_size + costs.per_token_s
        return expected_tokens(p, k) * share / (share + k * (costs.per_token_s + costs.draft_token_s))

    checked = 0
    for p in [i / 40 for i in range(41)]:
        for costs in [Costs(a, b, q) for a in (0.0005, 0.01) for b in (0.0, 0.001) for q in (0.0, 0.0005, 0.01)]:
            for batch_size in (1, 8):
                for k_max in (1, 2, 4, 16):
                    full = max(range(k_max + 1), key=lambda k: (score(p, k, costs, batch_size), -k))
                    k = choose_k(p, k_max, costs, batch_size)
                    assert abs(score(p, k, costs, batch_size) - score(p, full, costs, batch_size)) <= 1e-12
                    checked += 1
    assert checked == 41 * 12 * 2 * 4


def test_a_wait_for_the_next_probe_ends_when_the_batch_size_changes_not_with_the_fit() -> None:
    """Between two probes the rule is not run again (adaptive.py, `ProbeSchedule.waiting`)."""
    spec = _speculator_with_costs()
    seq = _running()
    seq.spec_acceptance = 0.4  # k = 0 at B = 8 (test_choose_k_table), k = 2 at B = 1: 1.56 * 11/13
    spec.skip_step(8, 8)
    assert [spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100) for _ in range(3)] == [0, 0, 0]
    spec.skip_step(1, 1)  # the batch shrank: the rule runs again at once
    assert spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100) == 2
    # the fit moving alone does not end a wait: at B = 1, acceptance 0.05 skips (interval 8) ...
    seq.spec_acceptance = 0.05
    assert [spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100) for _ in range(2)] == [0, 0]
    for n in [1, 5, 300, 1, 5, 5, 120, 1, 5, 5, 5, 1, 5, 64, 5, 5] * 40:
        spec.costs.observe_pass(n, 1.0 + 0.001 * n)  # a = 1 s: drafting is almost free, k = 2 would pay
    fitted = spec.costs.costs()
    assert fitted is not None and choose_k(0.05, 4, fitted, 1) == 2
    ks = [spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100) for _ in range(8)]
    assert ks == [0] * 6 + [2, 2]  # ... until the wait runs out (8 skipped): the rule runs first, and pays


def test_a_probe_that_drafted_nothing_probes_again_at_the_next_step() -> None:
    probes = ProbeSchedule()
    assert _gaps(probes, 3, 1) == [3]
    probes.drafted_nothing()  # the probe's n-gram lookup found no match
    assert _gaps(probes, 3, 3) == [0, 6, 12]  # again at once, not doubled; then unpaid probes double
    probes.drafted_nothing()  # after the 12-step wait's probe: probe again
    probes.drafted_nothing()  # no probe since: no effect
    assert [probes.skip(3) for _ in range(3)] == [False, True, True]


def test_the_speculator_reprobes_a_request_whose_probe_found_no_ngram() -> None:
    """End to end through `Speculator.propose` with the real n-gram proposer: tokens without a
    repeated bigram give an empty draft, and the request probes again at its next step."""
    spec = _speculator_with_costs()
    seq = _running()  # tokens 5, 6, 7, 8, 9: no bigram occurs twice
    seq.spec_acceptance = 0.0
    ks = [spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100) for _ in range(9)]
    assert ks == [0] * 8 + [4]
    assert spec.propose([seq], [4])[0].token_ids == ()
    assert spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100) == 4
    assert spec.counters.probes == 2
