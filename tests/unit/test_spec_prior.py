"""The worker prior for a new request's acceptance (engine/spec/prior.py) and the end-of-request
probe rule (engine/spec/adaptive.py), alone and through the speculator: the exact k chosen for
scripted outcomes."""

from __future__ import annotations

from tandem.common.request import Request, SamplingParams
from tandem.engine.sequence import Sequence
from tandem.engine.spec.adaptive import ProbeSchedule, update_acceptance
from tandem.engine.spec.config import SpeculativeConfig
from tandem.engine.spec.ngram import NgramProposer
from tandem.engine.spec.prior import PRIOR_MIN_REQUESTS, PRIOR_REFRESH_REQUESTS, AcceptancePrior
from tandem.engine.spec.speculator import Speculator

GREEDY = SamplingParams(max_tokens=1000, temperature=0.0)


def _speculator() -> Speculator:
    """With the step costs of `test_spec_adaptive`: a = 10 ms, b = 1 ms, q = 0; at B = 1 the
    probe interval is 8 and k = 0 below acceptance 1/11."""
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2}')
    spec = Speculator(config, NgramProposer(2, 2), max_num_batched_tokens=256)
    for n in [1, 5, 300, 1, 5, 5, 120, 1, 5, 5, 5, 1, 5, 64, 5, 5]:
        spec.costs.observe_pass(n, 0.010 + 0.001 * n)
    return spec


def _running(request_id: str, sampling: SamplingParams = GREEDY) -> Sequence:
    seq = Sequence(Request(request_id, (5, 6, 7, 8), sampling), b"", 4096)
    seq.token_ids.append(9)  # its first generated token
    seq.num_computed_tokens = seq.num_tokens - 1
    return seq


def _k(spec: Speculator, seq: Sequence) -> int:
    return spec.num_draft_tokens(seq, False, budget_left=100, free_positions=100)


def _decode(seq: Sequence, num_tokens: int = 1) -> None:
    """The step's tokens are sampled: the sequence grows by `num_tokens`."""
    seq.token_ids.extend([10] * num_tokens)
    seq.num_computed_tokens = seq.num_tokens - 1


def test_the_prior_is_the_mean_of_the_first_requests_then_an_exponential_average() -> None:
    prior = AcceptancePrior()
    for estimate in (1.0, 0.0, 0.5):
        prior.observe(estimate)
        assert prior.for_new_request() is None and prior.current is None  # too few requests yet
    prior.observe(0.0)
    assert PRIOR_MIN_REQUESTS == 4
    assert prior.value == prior.current == 0.375  # the mean of the four
    prior.observe(1.0)
    assert prior.value == 0.53125  # 0.375 + 0.25 * (1 - 0.375)
    assert prior.requests == 5


def test_one_new_request_in_sixteen_refreshes_the_prior() -> None:
    prior = AcceptancePrior()
    for _ in range(PRIOR_MIN_REQUESTS):
        prior.observe(0.0)
    assert PRIOR_REFRESH_REQUESTS == 16
    started = [prior.for_new_request() for _ in range(2 * PRIOR_REFRESH_REQUESTS)]
    assert started == ([0.0] * 15 + [None]) * 2
    prior.observe(0.0)  # the refreshing request's first estimate: the count starts over
    assert [prior.for_new_request() for _ in range(16)] == [0.0] * 15 + [None]


def test_a_new_request_starts_on_the_prior_with_its_probe_interval_doubled() -> None:
    spec = _speculator()
    # four requests, each drafting k_max first (no prior yet); each verified draft accepts none
    for i in range(PRIOR_MIN_REQUESTS):
        seq = _running(f"r{i}")
        assert _k(spec, seq) == 4
        seq.spec_acceptance = update_acceptance(None, 4, 0)
        assert _k(spec, seq) == 0  # the rule's first run after the draft gives the prior its estimate
    assert spec.prior.value == 0.0 and spec.prior.requests == 4
    fresh = _running("new")
    ks = [_k(spec, fresh) for _ in range(18)]
    assert ks == [0] * 16 + [4, 0]  # the interval is 8: doubled, as after one unpaid probe
    assert fresh.spec_acceptance is None  # the prior is not the request's own estimate
    # a seeded sampled request is decided by its own history only: k_max before its first draft
    seeded = _running("seeded", SamplingParams(max_tokens=1000, temperature=0.8, seed=3))
    assert _k(spec, seeded) == 4


def test_a_prior_that_pays_lets_a_new_request_draft_at_once() -> None:
    spec = _speculator()
    for i in range(PRIOR_MIN_REQUESTS):
        seq = _running(f"r{i}")
        assert _k(spec, seq) == 4
        seq.spec_acceptance = update_acceptance(None, 4, 1)  # 0.5: k = 2 at B = 1
        assert _k(spec, seq) == 2
    assert spec.prior.value == 0.5
    assert _k(spec, _running("new")) == 2


def test_a_request_does_not_probe_within_an_interval_of_its_max_tokens() -> None:
    probes = ProbeSchedule()
    # 8 skipped steps, then the probe is due; 9 tokens left would still allow it, 8 do not
    assert [probes.skip(8, steps_left=20 - i) for i in range(9)] == [True] * 8 + [False]
    probes = ProbeSchedule()
    assert [probes.skip(8, 4, 1, steps_left=16 - i) for i in range(12)] == [True] * 12
    assert probes.waiting(4, 1)  # too close to its end: it waits until the rule's inputs change
    assert not probes.waiting(3, 1)


def test_the_speculator_no_longer_probes_in_a_requests_last_steps() -> None:
    """max_tokens caps k_max in the last steps; that shrank the interval and, with the skipped
    steps counted so far, made the request probe there. Now it skips to its end."""
    spec = _speculator()
    seq = _running("r", SamplingParams(max_tokens=15, temperature=0.0))
    seq.spec_acceptance = 0.0
    ks = []
    while seq.num_output_tokens < 15:
        ks.append(_k(spec, seq))
        _decode(seq)
    # 14 steps left after the first token: 8 skipped, then a probe would leave only 6 after it
    assert ks == [0] * 14
    assert spec.counters.probes == 0
    longer = _running("longer", SamplingParams(max_tokens=20, temperature=0.0))
    longer.spec_acceptance = 0.0
    ks = []
    while longer.num_output_tokens < 20:
        k = _k(spec, longer)
        ks.append(k)
        _decode(longer, 1 if k == 0 else k + 1)
        if k:  # every draft is accepted: acceptance 0.5 after the probe (k = 2), then 0.75
            longer.spec_acceptance = update_acceptance(longer.spec_acceptance, k, k)
    # 19 left: 8 skipped, then the probe with 11 left (5 tokens), k = 2 (3), k_max = 2 (3)
    assert ks == [0] * 8 + [4, 2, 2]
    assert spec.counters.probes == 1
