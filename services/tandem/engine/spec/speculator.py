"""The batcher's side of speculative decoding: how many drafts each sequence gets this step.

Owner: the batcher (the engine's step loop). It owns the proposer: `propose` is called from
`Batcher.schedule`, `rollback` from `Batcher.update` (after a verification) and from a
preemption (0 valid tokens), `finish` from `Batcher.finish`.

Which chunks carry drafts: a running sequence's chunk that catches up with all its tokens
(usually its one new token; also the last chunk of a recompute), once the request has its
first generated token, never on a prefill worker (`hand_off`). The first token is always
sampled without speculation, as a prefill worker samples it, so that a seeded request has the
same verification rounds colocated and disaggregated.

k for one sequence, in order: 0 if its params forbid speculation, or if the per-step rule
skips and `batch_may_decide` (skip.py); k_max = `num_speculative_tokens`, capped so that
prompt + output never exceed `max_tokens` or the context limit (at most k + 1 tokens are
emitted), and, for a request the batch may decide, by the step's budget and the free blocks;
then as many of those as its acceptance pays for (`choose_k`, with the step-time cost model
for a request the batch may decide), or k_max on a probe step (adaptive.py). A request the
batch may decide that has no estimate of its own yet is judged by the worker prior (prior.py:
what the recent requests' first drafts measured), which each request's first
verified draft then updates. A seeded sampled request never has k cut by the batch: the batcher
shortens its chunk instead, so that it samples next step.

Metrics (`AdaptiveCounters`): draft tokens withheld by the acceptance rule, steps it skipped
and probes it ran.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from tandem.engine.sequence import Sequence
from tandem.engine.spec.adaptive import ProbeSchedule, StepCosts, choose_k, probe_interval
from tandem.engine.spec.config import SpeculativeConfig
from tandem.engine.spec.prior import AcceptancePrior
from tandem.engine.spec.proposer import Draft, Proposer, ProposerContext, create_proposer
from tandem.engine.spec.skip import batch_may_decide, params_allow_speculation, skip_step


@dataclass
class AdaptiveCounters:
    withheld_tokens: int = 0  # draft tokens k_max allowed but the acceptance rule did not ask for
    skipped_steps: int = 0  # decode steps of a request at k = 0 that did not probe
    probes: int = 0


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_num_batched_tokens: int) -> None:
        self.config = config
        self.proposer = proposer
        # a chunk of 1 + k tokens must fit one step's budget
        self.max_k = min(config.num_speculative_tokens, max_num_batched_tokens - 1)
        self.costs = StepCosts()
        self.prior = AcceptancePrior()
        self.counters = AdaptiveCounters()
        self._probes: dict[str, ProbeSchedule] = {}
        self._batch_size = 1

    @classmethod
    def build(cls, speculative_config: str, context: ProposerContext, max_num_batched_tokens: int) -> Speculator:
        """The speculator of a `--speculative-config` JSON: its proposer, made for `context`."""
        config = SpeculativeConfig.parse(speculative_config)
        return cls(config, create_proposer(config, context), max_num_batched_tokens)

    def skip_step(self, num_running: int, num_batch_tokens: int) -> bool:
        """The per-step rule (skip.py); called once per step, before `num_draft_tokens`."""
        self._batch_size = max(num_running, 1)
        return skip_step(num_running, num_batch_tokens, self.config.disable_by_batch_size)

    @staticmethod
    def may_draft(seq: Sequence) -> bool:
        """True if `seq`'s catching-up chunk may carry drafts (module doc)."""
        return not seq.hand_off and seq.num_output_tokens >= 1 and params_allow_speculation(seq.sampling)

    def num_draft_tokens(self, seq: Sequence, step_skipped: bool, budget_left: int, free_positions: int) -> int:
        """k for `seq`'s catching-up chunk this step (module doc). `budget_left`: the budget
        after its chunk; `free_positions`: KV positions its blocks and the free blocks hold
        beyond that chunk. Counts a skipped decode step towards the next probe."""
        if not self.may_draft(seq) or self.max_k < 1:
            return 0
        decided_by_batch = batch_may_decide(seq.sampling)
        if decided_by_batch and step_skipped:
            return 0
        remaining_output = seq.sampling.max_tokens - seq.num_output_tokens
        remaining_context = seq.max_total_tokens - seq.num_tokens
        k_max = min(self.max_k, remaining_output - 1, remaining_context - 1)
        if decided_by_batch:
            k_max = min(k_max, budget_left, free_positions)
        if k_max <= 0:
            return 0
        probes = self._probes.get(seq.request_id)
        new = probes is None
        if probes is None:
            probes = self._probes[seq.request_id] = ProbeSchedule()
        elif probes.waiting(k_max, self._batch_size):  # between two probes: the rule's inputs unchanged
            return self._skip(k_max)
        acceptance = seq.spec_acceptance
        if acceptance is None:
            if decided_by_batch:
                acceptance = self.prior.for_new_request() if new else self.prior.current
        elif not probes.prior_observed:  # its first verified draft's estimate
            probes.prior_observed = True
            self.prior.observe(acceptance)
        costs = self.costs.costs() if decided_by_batch else None
        k = choose_k(acceptance, k_max, costs, self._batch_size)
        if k == 0:
            if new and acceptance is not None and seq.spec_acceptance is None:
                probes.count_prior()
            interval = probe_interval(k_max, costs, self._batch_size)
            if probes.skip(interval, k_max, self._batch_size, remaining_output):
                return self._skip(k_max)
            self.counters.probes += 1
            return k_max
        probes.drafted()
        self.counters.withheld_tokens += k_max - k
        return k

    def _skip(self, k_max: int) -> int:
        """A step of a request at k = 0 that does not probe: counted, no draft."""
        self.counters.skipped_steps += 1
        self.counters.withheld_tokens += k_max
        return 0

    def propose(self, seqs: Seq[Sequence], num_tokens: Seq[int]) -> list[Draft]:
        started = time.perf_counter()
        drafts = self.proposer.propose(seqs, num_tokens)
        self.costs.observe_draft(sum(num_tokens), time.perf_counter() - started)
        for seq, k, draft in zip(seqs, num_tokens, drafts):
            if len(draft.token_ids) > k:
                raise RuntimeError(f"proposer {self.proposer.name} drafted {len(draft.token_ids)} > {k} tokens")
            if not draft.token_ids and (probes := self._probes.get(seq.request_id)) is not None:
                probes.drafted_nothing()
        return drafts

    def rollback(self, request_id: str, num_valid_tokens: int) -> None:
        self.proposer.rollback(request_id, num_valid_tokens)

    def finish(self, request_id: str) -> None:
        self._probes.pop(request_id, None)
        self.proposer.finish(request_id)
