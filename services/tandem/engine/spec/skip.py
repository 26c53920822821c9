"""When to skip speculation: pure functions of counters, so a table test pins them down.

Per step (`skip_step`): skip when the step holds more running sequences than the config's
`disable_by_batch_size` (vLLM's rule), or when the tokens the step already computes without
drafts reach `COMPUTE_BOUND_TOKENS`: a forward pass over that many tokens is no longer
memory-bound (the weights are read once for them all), so extra draft rows cost compute in
proportion and the saved steps no longer pay for them.

Per request: how many tokens the request's acceptance pays for, down to none, with probes
(spec/adaptive.py).

Determinism: a seeded sampled request's output depends on where its verification rounds
fall, so a rule that depends on the rest of the batch (or on timings) must never change them.
The per-step rule and adaptive.py's cost model therefore apply only to requests for which
speculation cannot change the output (`batch_may_decide`: greedy, or unseeded). A seeded
sampled request is decided by its own history only: adaptive.py's fixed acceptance floor.
"""

from __future__ import annotations

from tandem.common.request import SamplingParams

COMPUTE_BOUND_TOKENS = 512


def params_allow_speculation(params: SamplingParams) -> bool:
    """False for a request whose output cannot be verified by plain logits comparison: one
    with `structured_output` (the grammar masks each position by the tokens before it) or a
    logits processor (presence/frequency/repetition penalties, `logit_bias`, `min_tokens`,
    `bad_words_token_ids`: engine/logits_processors.py). Such a request is never speculated,
    so its output is the non-speculative one by construction."""
    return params.structured_output is None and not params.has_controls


def batch_may_decide(params: SamplingParams) -> bool:
    """True if a batch-dependent rule may switch speculation off for this request without
    changing its output: greedy output is exact either way, an unseeded one is not
    reproducible anyway. A seeded sampled request is only decided by its own history."""
    return params.is_greedy or params.seed is None


def skip_step(num_running: int, num_batch_tokens: int, disable_by_batch_size: int | None) -> bool:
    """`num_batch_tokens`: the tokens the step computes before any draft."""
    if disable_by_batch_size is not None and num_running > disable_by_batch_size:
        return True
    return num_batch_tokens >= COMPUTE_BOUND_TOKENS
