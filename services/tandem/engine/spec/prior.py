"""The worker prior for a new request's acceptance (engine/spec/adaptive.py uses it).

A request has no estimate of its own until its first draft is verified. Paying drafts of
k_max (for a draft model, with its prefill of the prompt) to learn what the worker already
knows, and then its probes, were what was left of the cost of speculation that does not pay:
the bench's draft model on random prompts ran at 0.94-0.96 of plain decoding (thread CPU time),
with about 5 drafts per 128-token request. A request the batch may decide starts instead from
the prior: an
exponential average over requests (weight `PRIOR_EMA_WEIGHT` each) of the estimate that each
request's first verified draft gave, one value per request, so that requests that draft often
do not outweigh those that seldom draft. One request's first draft is weak evidence (0 of 4 on
a text its draft often gets right), so the prior is used only once `PRIOR_MIN_REQUESTS`
requests gave one, and until then it is their mean (the average's first weights are 1, 1/2,
1/3, ... down to `PRIOR_EMA_WEIGHT`). Where the prior says k = 0, that counts as the
request's first probe that did not pay (`ProbeSchedule.count_prior`): it starts on adaptive.py's
probe schedule with its interval doubled. So that the prior follows the traffic while no
request probes, one request in `PRIOR_REFRESH_REQUESTS` that would start on it drafts k_max
as on a new worker (as every request does before the first estimate). A seeded sampled
request never uses the prior (it is decided by its own history only).
"""

from __future__ import annotations

PRIOR_EMA_WEIGHT = 0.25  # weight of one request's first estimate in the prior
PRIOR_MIN_REQUESTS = 4  # first estimates before the prior is used
PRIOR_REFRESH_REQUESTS = 16  # at most this many new requests in a row start on an unrefreshed prior


class AcceptancePrior:
    """The worker's prior for a new request's acceptance (module doc): an exponential average
    over requests of their first verified draft's estimate."""

    def __init__(self) -> None:
        self.value: float | None = None
        self.requests = 0  # first estimates observed
        self._unrefreshed = 0  # new requests started on `value` since it was last observed

    @property
    def current(self) -> float | None:
        """The prior for a later decision of a request still without an estimate of its own."""
        return self.value if self.requests >= PRIOR_MIN_REQUESTS else None

    def for_new_request(self) -> float | None:
        """The prior for a request's first decision: None (draft as on a new worker) before
        `PRIOR_MIN_REQUESTS` estimates, and for one request in `PRIOR_REFRESH_REQUESTS` while
        no estimate came in."""
        if self.requests < PRIOR_MIN_REQUESTS or self._unrefreshed >= PRIOR_REFRESH_REQUESTS - 1:
            self._unrefreshed = 0
            return None
        self._unrefreshed += 1
        return self.value

    def observe(self, first_estimate: float) -> None:
        self.requests += 1
        weight = max(PRIOR_EMA_WEIGHT, 1.0 / self.requests)
        self.value = first_estimate if self.value is None else self.value + weight * (first_estimate - self.value)
        self._unrefreshed = 0
