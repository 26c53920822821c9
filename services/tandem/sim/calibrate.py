"""The CPU cost model: step times measured on the real engine, fitted by least squares.

On a CPU no roofline holds (no tensor cores, caches instead of HBM), but a step's time is still
close to linear in the roofline's terms, each with its own coefficient:

    seconds = step_s                                  (weights read once, launches, the batcher)
            + token_s x (prefill_tokens + decode_seqs)   (the linear layers: FLOPs per token)
            + decode_seq_s x decode_seqs              (per sampled sequence: LM head, sampler)
            + prefill_context_s x prefill_context_tokens (prefill attention: the quadratic term)
            + decode_context_s x decode_context_tokens   (decode attention: KV reads)

`fit(timings)` finds the coefficients by least squares on the relative error (each step's
residual divided by its measured time), none negative (a term that noise would make negative
is dropped and the rest refitted: a step never gets faster with more work). Relative, because
the measured steps span 3 ms decodes to 50 ms prefills: an absolute fit lets the large steps
set every coefficient and misses the small decode steps, which set ITL, by 10-30%. The
engine-side measurement is `tandem.loadtest.sim_calibration.calibrate(model_dir, ...)`: it runs
the real in-process engine (the simulator does not import the engine: layering, DESIGN.md
section 3) and returns the fitted `CalibratedCostModel`, which `save` / `load` keep as JSON.

A calibrated worker hands KV over `link` (default: the same-host gRPC path of the bench
cluster, bandwidth and latency set by the caller or left at their defaults).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tandem.sim.costmodel import Link
from tandem.sim.types import StepShape

FORMAT_VERSION = 1
TERMS = ("step_s", "token_s", "decode_seq_s", "prefill_context_s", "decode_context_s")
# KV hand-off on one host through gRPC over loopback (the bench cluster's path)
DEFAULT_CPU_LINK = Link(bandwidth=1e9, latency_s=1e-3)


@dataclass(frozen=True)
class StepTiming:
    """One measured step: its shape and its wall time in seconds."""

    step: StepShape
    seconds: float


def _features(step: StepShape) -> tuple[float, ...]:
    """The step's value of each of TERMS, in order."""
    return (
        1.0,
        float(step.prefill_tokens + step.decode_seqs),
        float(step.decode_seqs),
        float(step.prefill_context_tokens),
        float(step.decode_context_tokens),
    )


@dataclass(frozen=True)
class Coefficients:
    """Seconds per unit of each term (module docstring); all >= 0."""

    step_s: float
    token_s: float
    decode_seq_s: float
    prefill_context_s: float
    decode_context_s: float

    def __post_init__(self) -> None:
        for name in TERMS:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"coefficient {name} must be a finite number >= 0, got {value!r}")

    def seconds(self, step: StepShape) -> float:
        return sum(c * x for c, x in zip((getattr(self, t) for t in TERMS), _features(step)))


@dataclass(frozen=True)
class CalibratedCostModel:
    """The `CostModel` of one CPU worker, fitted from measured steps.

    `model_name` names the model it was measured on; `kv_bytes` is that model's KV bytes per
    token; `max_relative_error` is the fit's worst |predicted - measured| / measured over the
    timings it was fitted on (how far to trust it)."""

    model_name: str
    coefficients: Coefficients
    kv_bytes: int
    link: Link = DEFAULT_CPU_LINK
    max_relative_error: float = 0.0
    num_timings: int = 0

    def step_seconds(self, step: StepShape) -> float:
        """Wall time of one step; 0 for a step with no tokens (the worker is idle)."""
        if step.prefill_tokens + step.decode_seqs == 0:
            return 0.0
        return self.coefficients.seconds(step)

    def transfer_seconds(self, nbytes: int) -> float:
        return self.link.seconds(nbytes)

    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes


def relative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin sum(((a x - b) / b) ** 2) with x >= 0 (every b > 0): the fit that minimises the
    relative error of each row, so that small rows weigh as much as large ones."""
    return _nonnegative_least_squares(a / b[:, None], np.ones_like(b))


def _nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| with x >= 0: least squares, then drop the most negative term and
    refit until none is negative (an active-set method; exact when the free solution is >= 0)."""
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)  # columns differ by orders of magnitude
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        solution, *_ = np.linalg.lstsq(a[:, active] / scale[active], b, rcond=None)
        if (solution >= 0).all():
            x[active] = solution / scale[active]
            return x
        del active[int(np.argmin(solution))]
    return x


def fit(
    timings: Sequence[StepTiming],
    model_name: str,
    kv_bytes: int,
    link: Link = DEFAULT_CPU_LINK,
) -> CalibratedCostModel:
    """The cost model whose coefficients best fit `timings` (module docstring)."""
    if len(timings) < len(TERMS):
        raise ValueError(f"a fit needs at least {len(TERMS)} timings, got {len(timings)}")
    bad = [t.seconds for t in timings if not (math.isfinite(t.seconds) and t.seconds > 0)]
    if bad:
        raise ValueError(f"step times must be positive numbers of seconds, got {bad[:3]}")
    a = np.array([_features(t.step) for t in timings], dtype=np.float64)
    b = np.array([t.seconds for t in timings], dtype=np.float64)
    coefficients = Coefficients(*(float(c) for c in relative_least_squares(a, b)))
    worst = max(abs(coefficients.seconds(t.step) - t.seconds) / t.seconds for t in timings)
    return CalibratedCostModel(model_name, coefficients, kv_bytes, link, worst, len(timings))


def save(model: CalibratedCostModel, path: Path) -> None:
    """Write `model` as JSON (`load` reads it back equal)."""
    data = {"format_version": FORMAT_VERSION, **asdict(model)}
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load(path: Path) -> CalibratedCostModel:
    """Read a model written by `save`; ValueError names the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version must be {FORMAT_VERSION}, got {data.get('format_version')!r}")
        return CalibratedCostModel(
            model_name=str(data["model_name"]),
            coefficients=Coefficients(**data["coefficients"]),
            kv_bytes=int(data["kv_bytes"]),
            link=Link(**data["link"]),
            max_relative_error=float(data["max_relative_error"]),
            num_timings=int(data["num_timings"]),
        )
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"Cannot read the calibrated cost model {path}: {err!r}") from None
