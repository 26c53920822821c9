"""Acceptance-aware speculation: how many tokens a request's draft is worth this step.

Cost model (measured from the engine's own step timings, `StepCosts`): a target forward pass
over n tokens takes `a + b * n` seconds (a least-squares fit over recent steps, with
exponential forgetting `COST_FORGETTING`; prefill steps spread n widely, so the fit sees both
terms), and drafting costs `q` seconds per drafted token (the proposer call's time over the
tokens asked for; about 0 for the n-gram proposer). In a step of B running sequences one
request's share of a plain step is `s = a / B + b`; drafting k tokens adds `k * (b + q)`.

Gain model: the request's per-token acceptance p (`acceptance`, an exponential average of
each verified draft's estimate accepted / (accepted + 1 if one was rejected)) gives
`1 + p + ... + p^k` expected tokens per step with k drafts (vLLM's i.i.d. acceptance model).

`choose_k` picks the k in 0..k_max with the most expected tokens per unit of cost, `E(k) * s /
(s + k * (b + q))`; k = 0 scores 1, so a request drafts only when drafting is expected to pay.
E(k) is concave in k and the cost affine, so the score is unimodal: the search stops at its
first fall (at k = 1 for a request whose drafts do not pay).
Until the fit has `MIN_COST_SAMPLES` steps (or for a request not decided by the batch, spec/skip.py)
the cost model is not used: k_max, unless acceptance is below `LOW_ACCEPTANCE`.

Worker prior (spec/prior.py): a request the batch may decide that has no estimate of its own
yet is judged by what the worker's recent requests measured; where that says k = 0, it counts
as the request's first probe that did not pay (`ProbeSchedule.count_prior`).

Probes (`ProbeSchedule`, `probe_interval`): a request at k = 0 drafts k_max once after an
interval of skipped steps, so that its estimate can recover when its text turns repetitive.
The interval keeps the probes' cost near `PROBE_COST_SHARE` of the request's steps: a probe
costs `k_max * (b + q)` over a step's share s, so the interval is that over
`PROBE_COST_SHARE * s`, within [`PROBE_INTERVAL_STEPS`, `MAX_PROBE_INTERVAL_STEPS`]
(`PROBE_INTERVAL_STEPS` without the cost model). A cheap proposer (n-gram) probes often, an
expensive one (a draft model) seldom.

Back-off: a probe whose verification leaves the rule at k = 0 (judged at the request's next
decode step that reaches the rule) doubles the request's interval, up to
`MAX_BACKOFF_INTERVAL_STEPS`; a step at which the rule picks k >= 1 (after a paying probe or
otherwise) resets it to the cost-share interval. On text where drafting never pays, the probes'
share of a request's cost thus falls from `PROBE_COST_SHARE` to `PROBE_COST_SHARE * I0 / 512`
for a first interval I0 (8..64 steps: 0.08 % to 0.6 %), after at most 6 unpaid probes; a text that
turns repetitive is found at most 512 steps late. The schedule depends only on the request's
own outcomes and the interval the caller passes (for a seeded sampled request, the fixed
`PROBE_INTERVAL_STEPS`), so it stays deterministic. A probe for which the proposer drafted
nothing (an n-gram proposer without a match: it cost a lookup) is no outcome: the request
probes again at its next step, until a draft is verified or the rule drafts.

End of a request: a request that may generate at most an interval more tokens (`steps_left`,
from its `max_tokens`) does not probe: whatever the probe found would have fewer steps to pay
back its cost than the interval spreads that cost over. (Before, the interval shrank with k_max
when `max_tokens` capped it in a request's last steps, so the request probed there.)

Between two probes the rule is not run again (`ProbeSchedule.waiting`): a request at k = 0
verifies no draft, so its acceptance does not change; only a change of its k_max or of the
batch size (or the next probe) runs it again. Drift of the step-time fit alone does not end a
wait. This keeps the steps of a request that does not draft at a few microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOW_ACCEPTANCE = 0.25
ACCEPTANCE_EMA_WEIGHT = 0.5
PROBE_INTERVAL_STEPS = 8
MAX_PROBE_INTERVAL_STEPS = 64
MAX_BACKOFF_INTERVAL_STEPS = 512  # the back-off's bound (module doc)
NEVER = 1 << 62  # the wait of a request too close to its end to probe
PROBE_COST_SHARE = 0.05
COST_FORGETTING = 0.99  # weight of the older steps in the step-time fit, per new step
DRAFT_COST_EMA_WEIGHT = 0.1
MIN_COST_SAMPLES = 16


def update_acceptance(acceptance: float | None, num_draft_tokens: int, num_accepted_tokens: int) -> float:
    """The per-token acceptance estimate after one verified draft of `num_draft_tokens` >= 1."""
    rejected = 1 if num_accepted_tokens < num_draft_tokens else 0
    estimate = num_accepted_tokens / (num_accepted_tokens + rejected)
    if acceptance is None:
        return estimate
    return (1.0 - ACCEPTANCE_EMA_WEIGHT) * acceptance + ACCEPTANCE_EMA_WEIGHT * estimate


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one step emits with k drafts at per-token acceptance `acceptance`."""
    return sum(acceptance**i for i in range(k + 1))


@dataclass(frozen=True)
class Costs:
    fixed_s: float  # a: seconds of a target pass that do not grow with its tokens
    per_token_s: float  # b: seconds per token of a target pass
    draft_token_s: float  # q: seconds of drafting per drafted token


def _share_and_extra(costs: Costs, batch_size: int) -> tuple[float, float]:
    """(s, b + q): a request's share of a plain step, and the cost of one more drafted token."""
    return costs.fixed_s / max(batch_size, 1) + costs.per_token_s, costs.per_token_s + costs.draft_token_s


def choose_k(acceptance: float | None, k_max: int, costs: Costs | None, batch_size: int) -> int:
    """k for a request this step (module doc); 0 means no draft (a probe is the caller's)."""
    if acceptance is None or k_max <= 0:
        return max(k_max, 0)
    if costs is None:
        return 0 if acceptance < LOW_ACCEPTANCE else k_max
    share, extra = _share_and_extra(costs, batch_size)
    best_k, best = 0, 1.0
    expected, power = 1.0, 1.0
    for k in range(1, k_max + 1):
        power *= acceptance
        expected += power  # expected_tokens(acceptance, k)
        score = expected * share / (share + k * extra)
        if score <= best:
            break  # a concave gain over an affine cost: the score is unimodal in k, it only falls now
        best_k, best = k, score
    return best_k


def probe_interval(k_max: int, costs: Costs | None, batch_size: int) -> int:
    """Skipped steps between two probes of k_max drafts (module doc)."""
    if costs is None:
        return PROBE_INTERVAL_STEPS
    share, extra = _share_and_extra(costs, batch_size)
    steps = math.ceil(k_max * extra / (PROBE_COST_SHARE * share))
    return min(max(steps, PROBE_INTERVAL_STEPS), MAX_PROBE_INTERVAL_STEPS)


class ProbeSchedule:
    """Per request: its decode steps skipped at k = 0 since it last drafted, and the probe
    interval's back-off (module doc)."""

    def __init__(self) -> None:
        self.skipped = 0
        self.doublings = 0  # probes in a row that did not pay
        self.probed = False  # the last decision was a probe, not judged yet
        self._waiting: tuple[int, int, int] | None = None  # (k_max, batch size, interval) of the wait
        self._retry = False  # the last probe drafted nothing: probe again at the next step
        self.prior_observed = False  # the worker prior has seen this request's first estimate (prior.py)

    def interval(self, first_interval: int) -> int:
        """Skipped steps before the next probe, from the cost-share interval `first_interval`."""
        return min(first_interval << self.doublings, max(first_interval, MAX_BACKOFF_INTERVAL_STEPS))

    def skip(self, first_interval: int, k_max: int = 0, batch_size: int = 0, steps_left: int | None = None) -> bool:
        """Called for a step at k = 0: True to skip it, False to probe (draft k_max) now. A
        probe before it did not pay (the rule still says k = 0): the interval doubles.
        `k_max` and `batch_size`: the rule's inputs, remembered for `waiting`. `steps_left`:
        the most tokens the request may still generate (None: no bound); a request with no
        more than an interval of them left no longer probes (module doc)."""
        if self.probed:
            self.probed = False
            if self.interval(first_interval) < MAX_BACKOFF_INTERVAL_STEPS:
                self.doublings += 1
        interval = self.interval(first_interval)
        ending = steps_left is not None and steps_left <= interval
        if (self.skipped >= interval or self._retry) and not ending:
            self._retry = False
            self.skipped = 0
            self.probed = True
            self._waiting = None
            return False
        self.skipped += 1
        # a request too close to its end stays so: it waits until its rule's inputs change
        self._waiting = (k_max, batch_size, NEVER if ending else interval)
        return True

    def count_prior(self) -> None:
        """The worker prior, not an estimate of the request's own, put a new request at k = 0:
        that counts as one probe that did not pay (module doc)."""
        self.probed = True

    def waiting(self, k_max: int, batch_size: int) -> bool:
        """A step in the middle of a wait for the next probe: True (skip it, counted) if the
        rule's inputs are those it last saw (its acceptance cannot change without a verified
        draft) and the interval is not over; False: the caller runs the rule and `skip`."""
        waiting = self._waiting
        if waiting is None or waiting[0] != k_max or waiting[1] != batch_size or self.skipped >= waiting[2]:
            return False
        self.skipped += 1
        return True

    def drafted_nothing(self) -> None:
        """The proposer drafted nothing for this step (an n-gram without a match). After a
        probe: it cost about nothing and measured nothing, so it neither doubles the interval
        nor starts a new wait: the next step at k = 0 probes again."""
        if self.probed:
            self.probed = False
            self._retry = True

    def drafted(self) -> None:
        """Called for a step at k >= 1: drafting pays, the interval starts over."""
        self.skipped = 0
        self.doublings = 0
        self.probed = False
        self._waiting = None
        self._retry = False


class StepCosts:
    """The cost model's measurements (module doc): step times of target passes and the
    proposer's time per drafted token. Owned by the speculator; fed by the batcher."""

    def __init__(self) -> None:
        # weighted sums for the fit t = a + b * n: sum w, sum w n, sum w n^2, sum w t, sum w n t
        self._sums = [0.0] * 5
        self.samples = 0
        self.draft_token_s: float | None = None
        self._fitted: Costs | None = None
        self._stale = True  # an observation since `_fitted` was computed

    def observe_pass(self, num_tokens: int, seconds: float) -> None:
        n, t, f = float(num_tokens), seconds, COST_FORGETTING
        w, wn, wnn, wt, wnt = self._sums
        self._sums = [f * w + 1.0, f * wn + n, f * wnn + n * n, f * wt + t, f * wnt + n * t]
        self.samples += 1
        self._stale = True

    def observe_draft(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0:
            return
        per_token = seconds / num_tokens
        if self.draft_token_s is None:
            self.draft_token_s = per_token
        else:
            self.draft_token_s += DRAFT_COST_EMA_WEIGHT * (per_token - self.draft_token_s)
        self._stale = True

    def costs(self) -> Costs | None:
        """The fitted costs, or None before `MIN_COST_SAMPLES` passes or while the passes
        seen do not vary in size enough to separate a from b. Fitted once per observation (the
        batcher asks for every sequence of a step)."""
        if self._stale:
            self._fitted, self._stale = self._fit(), False
        return self._fitted

    def _fit(self) -> Costs | None:
        if self.samples < MIN_COST_SAMPLES:
            return None
        w, wn, wnn, wt, wnt = self._sums
        det = w * wnn - wn * wn
        if det <= 1e-9 * w * wnn:
            return None
        b = (w * wnt - wn * wt) / det
        a = (wt - b * wn) / w
        b = max(b, 0.0)
        a = max(a, 0.0)
        if a + b <= 0.0:
            return None
        return Costs(a, b, self.draft_token_s or 0.0)
