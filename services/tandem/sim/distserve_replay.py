"""Replays DistServe's real OPT-13B runs through the simulator and compares what each measured.

Source: the authors' simulator-alignment data in their artifact (github.com/LLMServe/DistServe,
branch feat-add-simulator, commit 0da64e6ef4c9b4032185548ed32d75fcfb45a340, folder
simdistserve/benchmarks/alignment/data-ground-truth/opt-13b-sharegpt/). Each `.exp` file is one
real run of `evaluation/2-benchmark-serving/2-benchmark-serving.py`, named
`<prefix>-<num_prompts>-<request_rate>.exp`: its first line a Python-literal list of per-request
dicts (`prompt_len`, `output_len`, `issue_time`, `first_token_time`, `complete_time`, `ttft_ms`,
`tpot_ms` = (complete - first token) / (output_len - 1), `latency_ms`), then a summary block.
Prefixes: `vllm` (vLLM 0.1.7, tensor parallelism 1); `distserve-c21d11` (DistServe, context
tp 2 pp 1, decoding tp 1 pp 1: the `2-start-api-server.py` tuple order, the placement the
artifact's alignment script `align_with_real.py` simulates for these files). Not replayed:
`distserve-c21d12` (decoding pipeline parallelism 2, which this simulator does not model) and
the unprefixed `distserve-*` runs (their placement is not named).

Each run's requests are replayed at their real issue times (relative to the first) with their
real lengths through `paper.deployments` (the PAPER variant: prefill fits calibrated on the
lowest-rate runs, `distserve_calibrate.py`; VLLM_CALIBRATED, vLLM's only; or ARTIFACT_FITS,
the artifact's realigned ones).
Per side: TTFT p50/p90 over all requests, TPOT p50/p90 over requests of two or more output
tokens, and the share meeting both of the paper's SLOs (TTFT <= 0.25 s, TPOT <= 0.1 s; `Records.num_good`'s rule).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.sim.distserve import CHATBOT_OPT_13B, PaperSetup
from tandem.sim.distserve_calibrate import exp_rows
from tandem.sim.paper import ARTIFACT_FITS, PAPER, VLLM_CALIBRATED, Deployment, Variant, deployments
from tandem.sim.results import percentile
from tandem.sim.types import TraceRequest

RUN_NAME = re.compile(r"^(vllm|distserve-c21d11)-(\d+)-(\d+(?:\.\d+)?)\.exp$")


@dataclass(frozen=True)
class RealRequest:
    issue_s: float  # relative to the run's first request
    prompt: int
    output: int
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class Figures:
    """One side's TTFT and TPOT p50/p90 (s) and SLO attainment (share of all requests)."""

    ttft_p50: float
    ttft_p90: float
    tpot_p50: float
    tpot_p90: float
    attainment: float

    @classmethod
    def of(cls, ttft: Sequence[float], tpot: Sequence[float | None], setup: PaperSetup) -> Figures:
        multi = [t for t in tpot if t is not None]
        good = sum(1 for f, t in zip(ttft, tpot) if f <= setup.ttft_slo_s and (t is None or t <= setup.tpot_slo_s))
        return cls(
            percentile(ttft, 50), percentile(ttft, 90), percentile(multi, 50), percentile(multi, 90), good / len(ttft)
        )


@dataclass(frozen=True)
class RunComparison:
    system: str  # "vllm" or "distserve-c21d11"
    num_requests: int
    rate_rps: float
    real: Figures
    simulated: Figures


def parse_run(text: str) -> tuple[RealRequest, ...]:
    """A `.exp` file's requests in issue order (module docstring); never evaluates code."""
    rows, start = exp_rows(text)
    return tuple(
        RealRequest(
            row["issue_time"] - start, row["prompt_len"], row["output_len"], row["ttft_ms"] / 1e3, row["tpot_ms"] / 1e3
        )
        for row in rows
    )


def replay(requests: Sequence[RealRequest], deployment: Deployment, setup: PaperSetup) -> Figures:
    """The simulator's figures for `requests` served by `deployment`."""
    trace = [TraceRequest(r.issue_s, r.prompt, r.output) for r in requests]
    records = deployment.simulate(trace).records
    if any(math.isnan(t) for t in records.finish_s):
        raise RuntimeError("the simulation left requests unfinished")
    ttft = [first - arrival for first, arrival in zip(records.first_token_s, records.arrival_s)]
    tpot = [
        (last - first) / (n - 1) if n > 1 else None
        for first, last, n in zip(records.first_token_s, records.finish_s, records.output_tokens)
    ]
    return Figures.of(ttft, tpot, setup)


def compare(folder: Path, setup: PaperSetup = CHATBOT_OPT_13B, variant: Variant = PAPER) -> list[RunComparison]:
    """Every vLLM and DistServe c21d11 run in `folder`, real vs simulated, by system then rate."""
    vllm, (distserve,) = deployments(setup, variant)
    runs = []
    for path in folder.iterdir():
        match = RUN_NAME.match(path.name)
        if match is None:
            continue
        system, n, rate = match[1], int(match[2]), float(match[3])
        requests = parse_run(path.read_text())
        real = Figures.of([r.ttft_s for r in requests], [r.tpot_s if r.output > 1 else None for r in requests], setup)
        simulated = replay(requests, vllm if system == "vllm" else distserve, setup)
        runs.append(RunComparison(system, n, rate, real, simulated))
    return sorted(runs, key=lambda run: (run.system != "vllm", run.rate_rps, run.num_requests))


def render(runs: Sequence[RunComparison]) -> str:
    """A Markdown table: real / simulated per figure, milliseconds and percent."""
    lines = [
        "| system | requests | rate (req/s) | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) | TPOT p90 (ms) "
        "| both SLOs met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        real, sim = run.real, run.simulated
        cells = [
            f"{getattr(real, name) * 1e3:.0f} / {getattr(sim, name) * 1e3:.0f}"
            for name in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")
        ]
        cells.append(f"{real.attainment:.0%} / {sim.attainment:.0%}")
        lines.append(f"| {run.system} | {run.num_requests} | {run.rate_rps:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    # a second argument names the variant: PAPER (default), VLLM_CALIBRATED or ARTIFACT_FITS
    VARIANTS = {"PAPER": PAPER, "VLLM_CALIBRATED": VLLM_CALIBRATED, "ARTIFACT_FITS": ARTIFACT_FITS}
    print(render(compare(Path(sys.argv[1]), variant=VARIANTS[sys.argv[2] if len(sys.argv) > 2 else "PAPER"])))
