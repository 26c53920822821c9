"""The probes that measure the served worker on the real cluster for `sim_validate`, and the
cost model fitted to them (`Serving.apply`); sim_validate's docstring says why and how.

A probe round is the same set of probe requests each time (`probe_round`); sim_validate runs
one before, between and after the segments of the validated run, and fits each segment on the
rounds on either side of it (`Serving.of`), so that the model is fitted on the machine's state
in the run's own period, not minutes away from it.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from tandem.loadtest.arrivals import ClosedLoop
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.suite.context import drive
from tandem.sim.calibrate import CalibratedCostModel, Coefficients, relative_least_squares

PROBE_PROMPT, PROBE_OUTPUT = 64, 48
PROBE_BATCHES = (1, 2, 4)
# prompt lengths across the workload's (random.yaml: 64-256); a prefill probe stops at 2 tokens
PREFILL_PROBE_PROMPTS, PREFILL_PROBE_OUTPUT = (64, 128, 192, 256), 2


@dataclasses.dataclass(frozen=True)
class ProbeRound:
    """What one round of probes measured: the decode probes' records by batch size and the
    prefill probes' TTFTs (seconds) by prompt length."""

    decodes: Mapping[int, Sequence[RequestRecord]]
    ttfts: Mapping[int, Sequence[float]]


def _probes(num: int, prompt: int, output: int, name: str) -> list[WorkloadRequest]:
    rng = random.Random(f"{name}-{prompt}")
    return [
        WorkloadRequest(f"{name}-{i}", tuple(rng.randrange(4, 500) for _ in range(prompt)), output) for i in range(num)
    ]


def decode_step_s(records: Sequence[RequestRecord]) -> list[float]:
    """Each request's mean gap between output tokens over the gaps that no other request's
    prefill can have fallen into (a gap that overlaps another request's wait for its first
    token); requests left with no gap are skipped."""
    waits = [(r.request_id, r.start_s, r.first_token_s) for r in records if r.first_token_s is not None]
    steps = []
    for record in records:
        times = record.token_times_s
        clean = [
            later - earlier
            for earlier, later in itertools.pairwise(times)
            if not any(rid != record.request_id and start < later and earlier < first for rid, start, first in waits)
        ]
        if clean:
            steps.append(statistics.fmean(clean))
    return steps


@dataclasses.dataclass(frozen=True)
class Serving:
    """What the probes measured on the real cluster, in seconds: the served decode step at each
    batch size (the median of its probes' `decode_step_s`) and the median TTFT alone at each
    of several prompt lengths."""

    decode_step_s: Mapping[int, float]
    ttft_alone_s: Mapping[int, float]

    @classmethod
    def of(cls, rounds: Sequence[ProbeRound]) -> Serving:
        """The medians over `rounds` together (each batch size's probes, each prompt length's)."""
        return cls(
            {b: statistics.median(s for r in rounds for s in decode_step_s(r.decodes[b])) for b in PROBE_BATCHES},
            {n: statistics.median(t for r in rounds for t in r.ttfts[n]) for n in PREFILL_PROBE_PROMPTS},
        )

    def apply(self, cost: CalibratedCostModel) -> tuple[CalibratedCostModel, float]:
        """`cost` as the served worker ran while the probes did, and the gateway latency:

        1. TTFT alone = a + scale x (the engine's token and attention terms of the prefill),
           fitted by relative least squares over the probed prompt lengths: the engine's token
           and attention terms are multiplied by `scale` (what the served worker's prefills cost
           over what the engine's did, at the probes' time);
        2. the fixed and per-decoded-sequence terms fitted (relative least squares) so that a
           decode step of each probed batch size takes what the served worker took;
        3. the gateway latency: a less the fixed term."""
        c = cost.coefficients
        lengths = sorted(self.ttft_alone_s)
        engine_prefill = [c.token_s * n + c.prefill_context_s * (n * (n + 1) // 2) for n in lengths]
        ttfts = np.array([self.ttft_alone_s[n] for n in lengths])
        intercept, scale = (
            relative_least_squares(np.array([[1.0, e] for e in engine_prefill]), ttfts)
            if len(lengths) >= 2
            else (0.0, 0.0)
        )
        if not scale > 0:
            raise ValueError(f"the probes' TTFTs {self.ttft_alone_s} give no prefill cost to scale {c} by")
        token_s, prefill_context_s, decode_context_s = (
            float(scale) * x for x in (c.token_s, c.prefill_context_s, c.decode_context_s)
        )
        context = PROBE_PROMPT + PROBE_OUTPUT // 2
        batches = sorted(self.decode_step_s)
        # what the served step adds to the scaled token and attention terms
        served = [self.decode_step_s[b] - b * (token_s + decode_context_s * context) for b in batches]
        if len(batches) < 2 or min(served) <= 0:
            raise ValueError(
                f"the probes' decode steps {self.decode_step_s} leave nothing to fit against {c} x {scale:.3g}"
            )
        fixed, per_seq = relative_least_squares(np.array([[1.0, b] for b in batches]), np.array(served))
        fitted = Coefficients(float(fixed), token_s, float(per_seq), prefill_context_s, decode_context_s)
        model = dataclasses.replace(cost, coefficients=fitted)
        return model, max(0.0, float(intercept) - fitted.step_s)


def probe_round(url: str, model: str, waves: int, name: str) -> ProbeRound:
    """One round of probes: closed-loop decode probes at each of PROBE_BATCHES (`waves`
    requests per slot), then prefill probes alone, each of PREFILL_PROBE_PROMPTS in turn
    (`waves` x 2 each)."""
    decodes = {}
    for batch in PROBE_BATCHES:
        probes = _probes(batch * waves, PROBE_PROMPT, PROBE_OUTPUT, f"{name}-b{batch}")
        decodes[batch] = list(drive(url, model, probes, ClosedLoop(batch)).records)
    prefills = [_probes(2 * waves, n, PREFILL_PROBE_OUTPUT, f"{name}-p{n}") for n in PREFILL_PROBE_PROMPTS]
    records = drive(url, model, [r for turn in zip(*prefills) for r in turn], ClosedLoop(1)).records
    ttfts: dict[int, list[float]] = {n: [] for n in PREFILL_PROBE_PROMPTS}
    for record in records:
        ttfts[record.prompt_tokens].append(record.ttft_s or 0.0)
    return ProbeRound(decodes, ttfts)


def drift_note(rounds: Sequence[ProbeRound]) -> str:
    """How far the served worker's speed moved from one probe round to the next (each segment
    is predicted at the speed of the rounds on either side of it). Other processes on the
    machine move it: with one window before and one after the whole run, the run's prefill
    steps were 15% slower to 15% faster than in the windows in six runs on the loaded machine,
    and the TTFT and ITL errors took that sign."""
    batch, prompt = min(PROBE_BATCHES), max(PREFILL_PROBE_PROMPTS)
    steps = " / ".join(f"{statistics.median(decode_step_s(r.decodes[batch])) * 1e3:.2f}" for r in rounds)
    ttfts = " / ".join(f"{statistics.median(r.ttfts[prompt]) * 1e3:.2f}" for r in rounds)
    return (
        f"Probe rounds, before, between and after the run's segments: served decode step at batch {batch} "
        f"{steps} ms; TTFT alone at {prompt} prompt tokens {ttfts} ms."
    )
