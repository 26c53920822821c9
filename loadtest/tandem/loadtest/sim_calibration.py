"""Calibrate the simulator's CPU cost model on the real in-process engine.

`calibrate(model_dir, grid)` loads the engine (`Engine.from_pretrained`, prefix caching off so
that every prompt token is computed), times its steps on a grid of shapes, and fits
`tandem.sim.calibrate.CalibratedCostModel` (least squares on the roofline's terms). The grid:

1. prefill: one prompt of each of `prefill_tokens`, computed in one step (context 1 + 2 + ... + n);
2. chunked prefill: a prompt of the largest size computed in chunks of `prefill_chunk_tokens`
   (chunk k attends to the k earlier chunks too);
3. decode: for each batch size b and context c, b prompts of c tokens are prefilled (untimed),
   then `decode_steps` steps of b sequences are timed (each sequence attends its prompt and the
   tokens it has so far).

Each shape runs `repeats` times and its fastest time is kept: on a shared machine a run
is only ever slowed down by the others, so the minimum is the most repeatable estimate of a
step's own cost (as `timeit` advises). The repeats are rounds over the whole grid, not one
shape's repeats back to back: a burst of load from another process then slows one round of a
shape, not all its repeats (back to back, one burst of a second or two moved the fitted
per-token cost by 80%). This lives in loadtest, not in `tandem.sim`: the simulator does not
import the engine (layering).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from tandem.common.request import SamplingParams
from tandem.engine.engine import Engine
from tandem.sim.calibrate import DEFAULT_CPU_LINK, CalibratedCostModel, StepTiming, fit
from tandem.sim.costmodel import Link
from tandem.sim.types import StepShape


@dataclass(frozen=True)
class CalibrationGrid:
    """The step shapes `calibrate` times (module docstring)."""

    prefill_tokens: tuple[int, ...] = (16, 128, 512)
    prefill_chunk_tokens: int = 128
    decode_batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_context_tokens: tuple[int, ...] = (32, 256)
    decode_steps: int = 4
    repeats: int = 5

    def __post_init__(self) -> None:
        sizes = (*self.prefill_tokens, *self.decode_batch_sizes, *self.decode_context_tokens)
        if not self.prefill_tokens or not self.decode_batch_sizes or not self.decode_context_tokens:
            raise ValueError("a calibration grid needs prefill sizes, decode batch sizes and decode contexts")
        if min(sizes) < 1 or min(self.prefill_chunk_tokens, self.decode_steps, self.repeats) < 1:
            raise ValueError(f"every size, count and repeat of a calibration grid must be >= 1: {self}")

    def max_tokens_in_flight(self, budget: int) -> int:
        """KV tokens the largest decode configuration may hold (`decode_max_tokens` each)."""
        batch, context = max(self.decode_batch_sizes), max(self.decode_context_tokens)
        return batch * (context + decode_max_tokens(batch, context, self.decode_steps, budget))


def decode_max_tokens(batch: int, context: int, steps: int, budget: int) -> int:
    """Output tokens a decode measurement's sequence may need: the timed steps, plus one per
    untimed prefill step (a sequence prefilled early decodes while the others prefill). At
    most one step per sequence plus one per budget of prompt tokens prefill the batch."""
    return steps + 1 + batch + math.ceil(batch * context / budget)


def _prompt(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    return [int(t) for t in rng.integers(0, vocab_size, size=length)]


def _context_sum(start: int, count: int) -> int:
    """Sum of the contexts of tokens start+1 .. start+count (each attends to itself and all before)."""
    return count * start + count * (count + 1) // 2


class StepTimer:
    """Runs measurements on one engine; every request gets a fresh id and fresh random tokens."""

    def __init__(self, engine: Engine, seed: int) -> None:
        self.engine = engine
        self.budget = engine.config.max_num_batched_tokens
        self.rng = np.random.default_rng(seed)
        self.vocab_size = engine.model_config.vocab_size
        self.next_id = 0

    def add(self, length: int, max_tokens: int) -> str:
        request_id = f"calibrate-{self.next_id}"
        self.next_id += 1
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.engine.add_request(request_id, _prompt(self.rng, length, self.vocab_size), sampling)
        return request_id

    def timed_step(self) -> float:
        start = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - start

    def prefill(self, length: int, chunk: int) -> list[StepTiming]:
        """One prompt of `length` tokens, computed in steps of at most `chunk` tokens."""
        self.add(length, max_tokens=1)
        timings = []
        for start in range(0, length, chunk):
            count = min(chunk, length - start)
            seconds = self.timed_step()
            timings.append(
                StepTiming(StepShape(prefill_tokens=count, prefill_context_tokens=_context_sum(start, count)), seconds)
            )
        if self.engine.has_unfinished():
            raise RuntimeError(f"a {length}-token prefill took more steps than chunks of {chunk}")
        return timings

    def decode(self, batch: int, context: int, steps: int) -> list[StepTiming]:
        """`batch` prompts of `context` tokens, prefilled untimed, then `steps` timed decode steps."""
        max_tokens = decode_max_tokens(batch, context, steps, self.budget)
        ids = [self.add(context, max_tokens) for _ in range(batch)]
        generated = dict.fromkeys(ids, 0)
        while min(generated.values()) == 0:
            for out in self.engine.step():
                generated[out.request_id] += len(out.new_token_ids)
        timings = []
        for _ in range(steps):
            # each sequence feeds its last token and attends to its prompt and its tokens so far
            attended = sum(context + n for n in generated.values())
            start = time.perf_counter()
            outputs = self.engine.step()
            seconds = time.perf_counter() - start
            if len(outputs) != batch:
                raise RuntimeError(f"a decode step of {batch} sequences produced {len(outputs)} outputs")
            for out in outputs:
                generated[out.request_id] += len(out.new_token_ids)
            timings.append(StepTiming(StepShape(decode_seqs=batch, decode_context_tokens=attended), seconds))
        for request_id in ids:
            self.engine.abort(request_id)
        self.engine.take_aborted()
        return timings


def fastest_of_rounds(measurements: Sequence[Callable[[], list[StepTiming]]], rounds: int) -> list[StepTiming]:
    """Run every measurement once per round, `rounds` rounds; each run of a measurement gives
    the same shapes in the same order: keep each shape's fastest time. Returned in the order of
    `measurements`."""
    runs: list[list[list[StepTiming]]] = [[] for _ in measurements]
    for _ in range(rounds):
        for kept, measure in zip(runs, measurements):
            kept.append(measure())
    fastest = []
    for kept in runs:
        for same in zip(*kept):
            if len({t.step for t in same}) != 1:
                raise RuntimeError(f"a measurement's rounds timed different shapes: {[t.step for t in same]}")
            fastest.append(StepTiming(same[0].step, min(t.seconds for t in same)))
    return fastest


def calibrate(
    model_dir: Path,
    grid: CalibrationGrid = CalibrationGrid(),
    *,
    link: Link = DEFAULT_CPU_LINK,
    engine_options: Mapping[str, object] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
) -> CalibratedCostModel:
    """Time the engine on `grid` (module docstring) and fit the CPU cost model.

    `engine_options` go to `Engine.from_pretrained` (e.g. `num_threads`); the budget, sequence
    limit, KV size and prefix caching are set here to fit the grid."""
    largest = max(grid.prefill_tokens)
    budget = max(largest, max(grid.decode_batch_sizes) * 2)
    blocks = math.ceil(grid.max_tokens_in_flight(budget) / 16) + max(grid.decode_batch_sizes) + math.ceil(largest / 16)
    options: dict[str, object] = {
        "block_size": 16,
        "num_blocks": blocks,
        "max_num_batched_tokens": budget,
        "max_num_seqs": max(grid.decode_batch_sizes),
        "enable_prefix_caching": False,
        **(engine_options or {}),
    }
    whole = StepTimer(Engine.from_pretrained(model_dir, **options), seed)
    whole.prefill(min(64, largest), min(64, largest))  # warm-up (first-call allocations), not kept
    chunk = grid.prefill_chunk_tokens
    chunked = StepTimer(Engine.from_pretrained(model_dir, **options, max_prefill_chunk_tokens=chunk), seed)
    measurements = [partial(whole.prefill, length, length) for length in grid.prefill_tokens]
    measurements.append(partial(chunked.prefill, largest, chunk))
    shapes = [(batch, context) for batch in grid.decode_batch_sizes for context in grid.decode_context_tokens]
    measurements += [partial(whole.decode, batch, context, grid.decode_steps) for batch, context in shapes]
    timings = fastest_of_rounds(measurements, grid.repeats)
    log("calibration step times (ms, grid order): " + " ".join(f"{t.seconds * 1e3:.2f}" for t in timings))
    whole.engine.check_integrity()
    return fit(timings, model_dir.name, whole.engine.kv_spec.bytes_per_token, link)
