"""Fits a prefill step time to the real runs' TTFTs of prompts whose prefill step ran alone.

Source: the authors' real OPT-13B runs (`distserve_replay.py` names the files). A run's
requests are `TimedRequest`s; two selections of those whose prefill step held their prompt only:
- `empty_system`: every earlier request had completed before it was issued, so its TTFT is one
  prefill step plus fixed overhead. In every real run these are exactly the run's first two
  requests (55 and 829 prompt tokens: all runs replay prefixes of one seeded sample), too few
  and too alike to determine three coefficients.
- `alone_in_step`: no earlier request was waiting for or in its prefill (every earlier request
  had its first token before this one was issued) and no later request was issued before this
  one's first token. vLLM 0.1.7 puts every waiting prompt into the next prompt step
  (`legacy_vllm.py`), so this prompt's step held it alone; DistServe's prefill instance batches
  waiting prompts the same way. Its TTFT is that step, the fixed overhead, and the rest of the
  step running when it arrived: the running batch's decode step (vLLM) or nothing (DistServe's
  prefill instance, idle when no prompt waits).

The target of a request of L prompt tokens is its TTFT less `wait_ms` (ASSUMPTION: half the
running batch's decode step, as the unchanged decode fit and Ray term price it; arrivals are
Poisson, independent of the step's phase) less the Ray term of the step itself (2 ms + 1e-4 ms
per token, which `ProfileCostModel` adds on top). `fit_prefill` fits a + b L + c L^2 to the
targets by least squares on the relative error, with a, b, c >= 0; the intercept absorbs the
fixed overhead (the HTTP request and tokenisation in the client's TTFT).
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.sim.distserve_profile import (
    RAY_OVERHEAD_MS,
    RAY_OVERHEAD_MS_PER_TOKEN,
    VLLM_OPT_13B,
    Fit,
    StepFit,
)


@dataclass(frozen=True)
class TimedRequest:
    """One real request; times in seconds from the run's first issue."""

    prompt: int
    output: int
    issue_s: float
    first_token_s: float
    complete_s: float
    tpot_s: float

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_s - self.issue_s) * 1e3


Selection = Callable[[Sequence[TimedRequest]], list[int]]


def exp_rows(text: str) -> tuple[list[dict[str, Any]], float]:
    """A `.exp` file's per-request rows in issue order and the first issue time; parsed as a
    Python literal, never evaluated as code."""
    rows = ast.literal_eval(text.split("\n", 1)[0])
    rows.sort(key=lambda row: row["issue_time"])
    return rows, rows[0]["issue_time"]


def parse_timed(text: str) -> tuple[TimedRequest, ...]:
    """A `.exp` file's requests in issue order; never evaluates code."""
    rows, start = exp_rows(text)
    return tuple(
        TimedRequest(
            row["prompt_len"],
            row["output_len"],
            row["issue_time"] - start,
            row["first_token_time"] - start,
            row["complete_time"] - start,
            row["tpot_ms"] / 1e3,
        )
        for row in rows
    )


def empty_system(run: Sequence[TimedRequest]) -> list[int]:
    """Indices of the requests issued after every earlier request completed."""
    return [i for i, r in enumerate(run) if all(o.complete_s < r.issue_s for o in run[:i])]


def alone_in_step(run: Sequence[TimedRequest]) -> list[int]:
    """Indices of the requests whose prefill step held their prompt alone (module docstring)."""
    return [
        i
        for i, r in enumerate(run)
        if all(o.first_token_s <= r.issue_s for o in run[:i])
        and all(o.issue_s >= r.first_token_s for o in run[i + 1 :])
    ]


def wait_ms(run: Sequence[TimedRequest], index: int, decode: StepFit | None) -> float:
    """Half the decode step of the batch decoding when request `index` arrived (0 when none
    decodes or `decode` is None): its sequences' prompts plus the tokens generated so far."""
    t = run[index].issue_s
    batch = [o for o in run[:index] if o.first_token_s <= t < o.complete_s]
    if decode is None or not batch:
        return 0.0
    context = sum(o.prompt + min(o.output, 1 + int((t - o.first_token_s) / o.tpot_s)) for o in batch)
    a, b, c = decode.decode_small if len(batch) < decode.large_batch_from else decode.decode_large
    step = a + b * context + c * len(batch) + RAY_OVERHEAD_MS + RAY_OVERHEAD_MS_PER_TOKEN * context
    return step / 2


@dataclass(frozen=True)
class Sample:
    prompt: int
    target_ms: float  # TTFT less the wait and the step's Ray term


def samples(run: Sequence[TimedRequest], select: Selection, decode: StepFit | None) -> list[Sample]:
    """The selected requests' prefill targets (module docstring)."""
    return [
        Sample(
            run[i].prompt,
            run[i].ttft_ms - wait_ms(run, i, decode) - RAY_OVERHEAD_MS - RAY_OVERHEAD_MS_PER_TOKEN * run[i].prompt,
        )
        for i in select(run)
    ]


def fit_prefill(points: Sequence[Sample]) -> Fit:
    """a + b L + c L^2 >= 0 coefficients minimising the summed squared relative error: the best
    least-squares solution over every support of the three coefficients whose values are all
    nonnegative (exact for this convex problem). Raises ValueError when fewer than three
    distinct prompt lengths leave the fit undetermined."""
    if len({p.prompt for p in points}) < 3:
        raise ValueError(f"{len({p.prompt for p in points})} distinct prompt lengths cannot determine 3 coefficients")
    lengths = np.array([p.prompt for p in points], dtype=float)
    targets = np.array([p.target_ms for p in points], dtype=float)
    columns = np.stack([np.ones_like(lengths), lengths, lengths**2], axis=1) / targets[:, None]
    best: tuple[float, Fit] | None = None
    for size in (3, 2, 1):
        for support in itertools.combinations(range(3), size):
            solution = np.linalg.lstsq(columns[:, support], np.ones_like(targets), rcond=None)[0]
            if np.any(solution < 0):
                continue
            coefficients = [0.0, 0.0, 0.0]
            for column, value in zip(support, solution):
                coefficients[column] = float(value)
            error = float(np.sum((columns @ np.array(coefficients) - 1.0) ** 2))
            if best is None or error < best[0] - 1e-15:
                best = (error, (coefficients[0], coefficients[1], coefficients[2]))
    assert best is not None  # the one-coefficient supports are always nonnegative
    return best[1]


def relative_errors(fit: Fit, points: Sequence[Sample]) -> list[float]:
    """(model - target) / target per point."""
    a, b, c = fit
    return [(a + b * p.prompt + c * p.prompt**2 - p.target_ms) / p.target_ms for p in points]


def describe(name: str, fit: Fit, points: Sequence[Sample]) -> str:
    errors = relative_errors(fit, points)
    rms = (sum(e * e for e in errors) / len(errors)) ** 0.5
    worst = max(errors, key=abs)
    return (
        f"{name}: {len(points)} requests, a={fit[0]:.6g} ms, b={fit[1]:.6g} ms/token, c={fit[2]:.6g} ms/token^2; "
        f"relative error rms {rms:.1%}, worst {worst:+.1%}"
    )


def main(folder: Path) -> None:
    runs = {path.name: parse_timed(path.read_text()) for path in sorted(folder.glob("*.exp"))}
    for system, decode in (("vllm-", VLLM_OPT_13B[1]), ("distserve-c21d11-", None)):
        names = sorted((n for n in runs if n.startswith(system)), key=lambda n: float(n[:-4].rsplit("-", 1)[1]))
        lone = {n: [runs[n][i].prompt for i in empty_system(runs[n])] for n in names}
        print(f"{system}* empty-system requests (prompt lengths): {lone}")
        lowest = samples(runs[names[0]], alone_in_step, decode)
        print(describe(f"{names[0]} alone in step", fit_prefill(lowest), lowest))
        every = [s for n in names for s in samples(runs[n], alone_in_step, decode)]
        print(describe(f"all {len(names)} {system}* runs alone in step", fit_prefill(every), every))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
