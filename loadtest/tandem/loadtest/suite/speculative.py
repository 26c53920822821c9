"""Speculative decoding: decode tokens/s with and without it, side by side (`make bench` section).

In process on the bench model (float32), this process pinned to core `ENGINE_CPU` with one
torch thread, as the stack section pins its engine. For each workload and concurrency (1: the
requests one after another; 8: all at once) the engine without speculation and the one with it
run the same prompts alternately, `rounds` times each; tokens/s is the median of the rounds.
Every speculative run is also checked to return the same greedy tokens as the plain one.

Workloads (issue 17's benchmark):
(a) copy-heavy, n-gram: the bench model's random weights copy nothing from a prompt (a span
    written four times is not continued), and its greedy rollouts from random prompts do not
    repeat within 1500 tokens. From a context of one token repeated, however, many rollouts
    fall into a short cycle. `cycle_prompts` runs such rollouts for a fixed list of tokens,
    finds where each enters its cycle (`find_cycle`), and cuts the prompt after the cycle has
    been written `PROMPT_CYCLES` times: the greedy continuation of that prompt is the rest of
    the same rollout, which keeps repeating a span of the prompt.
(b) draft model: `make_bench_draft` (1 layer, distilled from the bench model's greedy outputs;
    its cost ratio and held-out agreement are reported), on random prompts and on (a)'s.
(c) low acceptance, n-gram on random prompts: almost every draft is wrong, and the per-request
    acceptance-aware rule (engine/spec/adaptive.py) must keep the cost small.

Acceptance rate: accepted / drafted tokens. Mean accepted length (vLLM's "mean acceptance
length"): tokens emitted per verified draft, 1 + accepted / drafts. Drafts: verified drafts
over all rounds, the sample both rest on (few where the rule keeps a request at k = 0). Withheld: draft tokens that
`num_speculative_tokens` allowed but the acceptance-aware rule (engine/spec/adaptive.py) did
not ask for; probes: drafts it ran at k = 0 to re-measure acceptance.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.engine import Engine, SamplingParams
from tandem.loadtest.bench.spec_draft import DistillConfig, make_bench_draft
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Figure, Section

ENGINE_CPU = 0
CONCURRENCIES = (1, 8)
NUM_SPECULATIVE_TOKENS = 4
START_REPEATS = 32  # the rollout's context: one token written this many times
PROMPT_CYCLES = 3  # the prompt ends after the cycle was written this many times
MAX_PERIOD = 12
ROLLOUT_TOKENS = 128  # room for PROMPT_CYCLES + 2 periods of MAX_PERIOD after the start of a cycle
COPY_GOAL, DRAFT_GOAL, WORST_CASE_GOAL = 2.0, 1.0, 0.9
NGRAM = {"method": "ngram", "num_speculative_tokens": NUM_SPECULATIVE_TOKENS, "prompt_lookup_min": 2}


def find_cycle(tokens: Sequence[int], min_repeats: int, max_period: int = MAX_PERIOD) -> tuple[int, int] | None:
    """(period, start) of the shortest period p <= `max_period` such that `tokens[start:]` is
    p-periodic and holds at least `min_repeats` whole periods, with `start` as small as it can
    be for that p; None if there is none."""
    n = len(tokens)
    for period in range(1, min(max_period, n) + 1):
        start = n - period
        while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
            start -= 1
        if n - start >= min_repeats * period:
            return period, start
    return None


def cycle_prompts(engine: Engine, count: int, rollout_tokens: int) -> list[list[int]]:
    """`count` copy-heavy prompts (module doc, (a)): for the tokens 4, 5, 6, ... in order, the
    greedy rollout of `START_REPEATS` copies of the token; a rollout that ends in a cycle of
    period >= `NUM_SPECULATIVE_TOKENS`, repeated at least `PROMPT_CYCLES` + 2 times, gives the
    prompt start + rollout up to the end of its `PROMPT_CYCLES`-th period. Shorter periods are
    left out: the n-gram proposer (as vLLM's) copies only tokens that exist, from the latest
    occurrence, so a cycle of period p gets drafts of p < k tokens. Raises if the first 512
    tokens do not give `count`."""
    greedy = SamplingParams(max_tokens=rollout_tokens, temperature=0.0, ignore_eos=True)
    prompts: list[list[int]] = []
    vocab = engine.model_config.vocab_size
    for first in range(4, min(vocab, 516), 32):
        starts = [[token] * START_REPEATS for token in range(first, min(first + 32, vocab))]
        for start, out in zip(starts, engine.generate(starts, greedy)):
            rollout = list(out.token_ids)
            cycle = find_cycle(rollout, PROMPT_CYCLES + 2)
            if cycle is not None and cycle[0] >= NUM_SPECULATIVE_TOKENS:
                period, begin = cycle
                prompts.append(start + rollout[: begin + PROMPT_CYCLES * period])
            if len(prompts) == count:
                return prompts
    raise RuntimeError(f"only {len(prompts)} of {count} rollouts fell into a cycle")


@dataclass(frozen=True)
class Measured:
    plain_tps: float
    spec_tps: float
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    withheld_tokens: int = 0  # draft tokens the acceptance-aware rule did not ask for (spec/adaptive.py)
    probes: int = 0

    @property
    def speedup(self) -> float:
        return self.spec_tps / self.plain_tps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts else 1.0


def _tokens_per_s(engine: Engine, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple[float, list]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs = []
    started = time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        outputs.extend(engine.generate(prompts[i : i + concurrency], params))
    elapsed = time.perf_counter() - started
    return sum(len(o.token_ids) for o in outputs) / elapsed, [list(o.token_ids) for o in outputs]


def measure(
    plain: Engine, spec: Engine, prompts: list[list[int]], max_tokens: int, concurrency: int, rounds: int
) -> Measured:
    """Both engines on the same prompts, alternately, `rounds` times; medians of tokens/s, and
    the speculative engine's draft counters over all its rounds. Raises if the tokens differ."""
    before = spec.stats
    counted = (before.spec_num_drafts, before.spec_num_draft_tokens, before.spec_num_accepted_tokens)
    assert spec.speculator is not None
    adaptive = spec.speculator.counters
    adaptive_before = (adaptive.withheld_tokens, adaptive.probes)
    plain_tps, spec_tps = [], []
    for _ in range(rounds):
        tps, expected = _tokens_per_s(plain, prompts, max_tokens, concurrency)
        plain_tps.append(tps)
        tps, got = _tokens_per_s(spec, prompts, max_tokens, concurrency)
        spec_tps.append(tps)
        if got != expected:
            raise RuntimeError("speculative greedy output differs from the plain engine's")
    after = spec.stats
    return Measured(
        statistics.median(plain_tps),
        statistics.median(spec_tps),
        after.spec_num_drafts - counted[0],
        after.spec_num_draft_tokens - counted[1],
        after.spec_num_accepted_tokens - counted[2],
        adaptive.withheld_tokens - adaptive_before[0],
        adaptive.probes - adaptive_before[1],
    )


def _pinned_run(ctx: BenchContext) -> Section:
    rounds, max_tokens = ctx.size(3, 1), ctx.size(128, 16)
    num_prompts = {1: ctx.size(4, 1), 8: 8}
    plain = Engine.from_pretrained(ctx.model_dir, num_threads=1)
    vocab = plain.model_config.vocab_size
    # quick: 2 prompts (the search is the slow part), repeated to fill concurrency 8
    copy = cycle_prompts(plain, ctx.size(8, 2), rollout_tokens=ROLLOUT_TOKENS)
    copy = [copy[i % len(copy)] for i in range(8)]
    gen = torch.Generator().manual_seed(17)
    random = [torch.randint(4, vocab, (len(p),), generator=gen).tolist() for p in copy]
    ctx.log("   building the draft model (make_bench_draft)")
    distill = DistillConfig() if not ctx.quick else DistillConfig(num_prompts=16, num_eval_prompts=4, steps=2)
    draft = make_bench_draft(ctx.model_dir, ctx.work_dir / "spec-draft", distill)
    draft_config = {"method": "draft_model", "model": str(draft.model_dir), "num_speculative_tokens": 2}
    engines = {
        "ngram": Engine.from_pretrained(ctx.model_dir, num_threads=1, speculative_config=json.dumps(NGRAM)),
        "draft_model": Engine.from_pretrained(
            ctx.model_dir, num_threads=1, speculative_config=json.dumps(draft_config)
        ),
    }
    workloads = (
        ("(a) copy-heavy", "ngram", copy, COPY_GOAL),
        ("(b) draft model, random prompts", "draft_model", random, DRAFT_GOAL),
        ("(b) draft model, copy-heavy prompts", "draft_model", copy, None),
        ("(c) low acceptance, random prompts", "ngram", random, WORST_CASE_GOAL),
    )
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for engine in (plain, *engines.values()):
        engine.generate(copy[:2], warm)
    rows = [
        (
            "workload",
            "method",
            "concurrency",
            "plain tok/s",
            "spec tok/s",
            "speedup",
            "acceptance",
            "mean len",
            "drafts",
            "withheld",
            "probes",
        )
    ]
    figures = []
    for name, method, prompts, goal in workloads:
        for concurrency in CONCURRENCIES:
            m = measure(plain, engines[method], prompts[: num_prompts[concurrency]], max_tokens, concurrency, rounds)
            ctx.log(f"   {name} c={concurrency}: {m}")
            rows.append(
                (
                    name,
                    method,
                    str(concurrency),
                    f"{m.plain_tps:.1f}",
                    f"{m.spec_tps:.1f}",
                    f"{m.speedup:.2f}",
                    f"{m.acceptance_rate:.3f}",
                    f"{m.mean_accepted_length:.2f}",
                    str(m.drafts),
                    str(m.withheld_tokens),
                    str(m.probes),
                )
            )
            figures.append(
                Figure(
                    f"{name}: speedup at concurrency {concurrency}", m.speedup, goal=goal if concurrency == 1 else None
                )
            )
            figures.append(Figure(f"{name}: acceptance rate at concurrency {concurrency}", m.acceptance_rate, ""))
            figures.append(
                Figure(f"{name}: mean accepted length at concurrency {concurrency}", m.mean_accepted_length, "")
            )
    setup = (
        f"bench model, float32, in process on core {ENGINE_CPU} with one torch thread; {max_tokens} greedy tokens "
        f"per request (EOS ignored); concurrency 1: {num_prompts[1]} requests one after another, concurrency 8: 8 "
        f"at once; median tokens/s of {rounds} alternating rounds of the plain and the speculative engine; every "
        f"speculative output equals the plain one. n-gram: {json.dumps(NGRAM)}. Copy-heavy prompts: greedy "
        f"rollouts of the bench model from {START_REPEATS} copies of one token (tokens 4, 5, ... in order), kept "
        f"when they end in a cycle of period "
        f"{NUM_SPECULATIVE_TOKENS} to {MAX_PERIOD} (the n-gram proposer "
        f"drafts at most one period), cut after the cycle's {PROMPT_CYCLES}rd copy: "
        f"their greedy continuation repeats the cycle, a span of the prompt (prompt lengths "
        f"{sorted(len(p) for p in copy)}). Random prompts: the same lengths, uniform tokens. Draft model: "
        f"{json.dumps({**draft_config, 'model': 'DRAFT'})}; {draft.description}."
    )
    notes = (
        f"draft cost ratio (target matmul weights per token / draft's): {draft.cost_ratio:.2f}x; held-out greedy "
        f"agreement {draft.agreement_after:.3f}.",
    )
    return Section(
        "speculative", "Speculative decoding: n-gram and draft model", setup, tuple(figures), tuple(rows), notes
    )


def run(ctx: BenchContext) -> Section:
    own, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {ENGINE_CPU})
    torch.set_num_threads(1)
    try:
        return _pinned_run(ctx)
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, own)
