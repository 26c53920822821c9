"""DistServe's chatbot result, as the simulator's reference case.

Source: Zhong et al., "DistServe: Disaggregating Prefill and Decoding for Goodput-optimized
Large Language Model Serving", OSDI 2024 (arXiv 2401.09670, the OSDI version), and its artifact
(github.com/LLMServe/DistServe, `evaluation/`).

What the paper publishes for the chatbot application on OPT-13B:
- Table 1: ShareGPT dataset; SLOs TTFT 0.25 s and TPOT 0.1 s (an earlier arXiv version printed
  TTFT 0.2 s; the OSDI text and the artifact's `ae-scripts/e2e/_plot.py` use 0.25 s).
- Section 6.1: 4 nodes of 8 NVIDIA SXM A100-80GB with NVLink, 25 Gbps across nodes; FP16; Poisson
  arrivals; goal: the highest per-GPU rate at which 90 % of requests meet both SLOs; vLLM runs
  OPT-13B with intra-op (tensor) parallelism 1.
- Section 6.2: "On the ShareGPT dataset, DistServe can sustain 2.0x-4.6x higher request rate
  compared to vLLM" (over OPT-13B, 66B and 175B). The per-model ratio is only drawn in Figure 8
  (top row); the text gives no number for OPT-13B alone, so `GAIN_VS_VLLM` is the range.
- The artifact's plot script counts DistServe's OPT-13B deployment as 3 GPUs and vLLM's as 1
  (per-GPU rates), and sweeps 0.25-3 req/s for vLLM and 0.75-9 req/s for DistServe.
- The artifact's server script (`evaluation/2-benchmark-serving/2-start-api-server.py`) places
  OPT-13B's DistServe as one prefill instance of tensor parallelism 2 and one decode instance of
  1 (context tp 2, pp 1; decoding tp 1, pp 1), and runs vLLM with tensor parallelism 1. Its
  simulator's README (`simdistserve/README.md`) finds the same placement by search on 4 A100s.

Lengths. The paper shows ShareGPT's input and output lengths only as histograms (Figure 7). The
artifact's sampling rule (`0-prepare-dataset.py`): conversations of at least 3 turns, a prompt
of the first k turns (k uniform), the next turn as output, OPT tokenizer, dropped when prompt +
output >= 2048 or both are under 4 tokens. The lengths the authors actually served are in their
real runs (`artifact_lengths`, the default): the 1600 (prompt, output) pairs of one run in the
artifact's simulator-alignment data (`data/distserve_sharegpt_opt13b.csv` names the source),
a uniform sample of their extraction: prompts mean 758.7 tokens (median 680, a third of
1000 tokens or more), outputs mean 186.3 (median 76.5). `EmpiricalLengths` replays such pairs;
`LogNormalLengths` is the earlier stand-in whose medians and spreads are this project's
ASSUMPTION, kept as an option for comparison.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import numpy as np

from tandem.sim.costmodel import MODELS
from tandem.sim.gpus import GPUS
from tandem.sim.types import GpuSpec, ModelShape, TraceRequest

PAPER = "DistServe (Zhong et al., OSDI 2024)"
MAX_TOTAL_TOKENS = 2048  # OPT's position embeddings: the artifact drops prompt + output >= 2048
MIN_TOKENS = 4  # the artifact drops a pair whose prompt and output are both shorter


@dataclass(frozen=True)
class PaperSetup:
    """One published DistServe experiment: the workload, the hardware, the SLOs and the result."""

    application: str
    dataset: str
    model: ModelShape
    gpu: GpuSpec
    ttft_slo_s: float
    tpot_slo_s: float
    attainment: float  # fraction of requests that must meet both SLOs
    gain_vs_vllm: tuple[float, float]  # per-GPU goodput of DistServe / vLLM: the published range
    distserve_gpus: int
    vllm_gpus: int
    source: str
    # the artifact's DistServe placement: tensor parallelism of the prefill and the decode instance
    distserve_prefill_tp: int = 1
    distserve_decode_tp: int = 1


CHATBOT_OPT_13B = PaperSetup(
    application="chatbot",
    dataset="ShareGPT",
    model=MODELS["opt-13b"],
    gpu=GPUS["A100"],
    ttft_slo_s=0.25,
    tpot_slo_s=0.1,
    attainment=0.9,
    gain_vs_vllm=(2.0, 4.6),
    distserve_gpus=3,
    vllm_gpus=1,
    source=f"{PAPER}: Table 1 (SLOs), section 6.1 (testbed, 90 % attainment), section 6.2 and "
    "Figure 8 (2.0x-4.6x over vLLM across OPT-13B/66B/175B); GPU counts from the artifact's "
    "evaluation/ae-scripts/e2e/_plot.py; placement (prefill tp 2, decode tp 1) from "
    "evaluation/2-benchmark-serving/2-start-api-server.py (MODEL_TO_PARALLEL_PARAMS)",
    distserve_prefill_tp=2,
    distserve_decode_tp=1,
)


class LengthSampler(Protocol):
    """(prompt tokens, output tokens) pairs, deterministic for a generator's state."""

    def sample(self, rng: np.random.Generator, count: int) -> list[tuple[int, int]]: ...


def _kept(prompt: int, output: int) -> bool:
    """The artifact's filter (`0-prepare-dataset.py`)."""
    return prompt + output < MAX_TOTAL_TOKENS and not (prompt < MIN_TOKENS and output < MIN_TOKENS)


@dataclass(frozen=True)
class EmpiricalLengths:
    """Replays measured (prompt, output) pairs, drawn uniformly with replacement."""

    pairs: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("EmpiricalLengths needs at least one (prompt, output) pair")
        bad = [p for p in self.pairs if min(p) < 1 or not _kept(*p)]
        if bad:
            raise ValueError(
                f"pairs must be >= 1 token each and pass DistServe's filter (prompt + output < "
                f"{MAX_TOTAL_TOKENS}); got {bad[:3]}"
            )

    def sample(self, rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
        return [self.pairs[int(i)] for i in rng.integers(0, len(self.pairs), size=count)]


@dataclass(frozen=True)
class LogNormalLengths:
    """Log-normal prompt and output lengths under DistServe's filter (rejection sampling).

    The defaults (prompt median 400 tokens, output median 150, both with log-sd 1.0) are an
    ASSUMPTION of this project standing in for ShareGPT, not figures from the paper."""

    prompt_median: float = 400.0
    prompt_sigma: float = 1.0
    output_median: float = 150.0
    output_sigma: float = 1.0

    def __post_init__(self) -> None:
        for name in ("prompt_median", "prompt_sigma", "output_median", "output_sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    def sample(self, rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
        pairs: list[tuple[int, int]] = []
        while len(pairs) < count:
            need = count - len(pairs)
            prompts = rng.lognormal(math.log(self.prompt_median), self.prompt_sigma, size=2 * need)
            outputs = rng.lognormal(math.log(self.output_median), self.output_sigma, size=2 * need)
            for p, o in zip(prompts, outputs):
                pair = (max(1, round(float(p))), max(1, round(float(o))))
                if _kept(*pair) and len(pairs) < count:
                    pairs.append(pair)
        return pairs


ARTIFACT_LENGTHS_FILE = "data/distserve_sharegpt_opt13b.csv"


@functools.cache
def artifact_lengths() -> EmpiricalLengths:
    """The (prompt, output) pairs of DistServe's real OPT-13B ShareGPT runs (module docstring)."""
    text = resources.files("tandem.sim").joinpath(ARTIFACT_LENGTHS_FILE).read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return EmpiricalLengths(tuple((int(row["prompt_len"]), int(row["output_len"])) for row in rows))


def chatbot_trace(
    num_requests: int, rate_rps: float, seed: int, lengths: LengthSampler | None = None
) -> tuple[TraceRequest, ...]:
    """`num_requests` chatbot requests with Poisson arrivals at `rate_rps` (as in section 6.1),
    lengths from `lengths` (default: `artifact_lengths()`, drawn with replacement); no shared
    prefixes."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise ValueError(f"rate_rps must be a positive number, got {rate_rps!r}")
    rng = np.random.default_rng(seed)
    gaps_s = rng.exponential(1.0 / rate_rps, size=max(num_requests - 1, 0))
    arrivals_s: Sequence[float] = [0.0] * min(num_requests, 1) + [float(t) for t in np.cumsum(gaps_s)]
    pairs = (lengths or artifact_lengths()).sample(rng, num_requests)
    return tuple(TraceRequest(at_s, prompt, output) for at_s, (prompt, output) in zip(arrivals_s, pairs))
