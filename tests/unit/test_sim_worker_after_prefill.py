"""A simulated worker asks its cost model for a step that follows a prefill step with
`StepShape.after_prefill`, and a decode run pays what that adds once, in its first step."""

from __future__ import annotations

import pytest

from tandem.sim.calibrate import CalibratedCostModel, Coefficients
from tandem.sim.sequence import SimSeq
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.worker import Delivery, SimWorker

# 1 ms a step, 10 us per decode context token, 0.5 ms for the step after a prefill step
COST = CalibratedCostModel("m", Coefficients(1e-3, 0.0, 0.0, 0.0, 1e-5, 0.0, 5e-4), kv_bytes=1)


def _worker_with_one_prefilled_prompt() -> SimWorker:
    """A worker that has prefilled a 4-token prompt (5 output tokens) in its first step, 1 ms."""
    worker = SimWorker(None, StepModelConfig(num_blocks=100), COST, 0.0)  # type: ignore[arg-type]
    worker.deliver(0.0, Delivery(SimSeq(0, 4, 9, False, None, 0), handoff=False))
    assert worker.start_step(0.0) == pytest.approx(1e-3, rel=1e-12)  # no step before it
    assert worker.finish_step().num_steps == 1
    return worker


def test_a_decode_run_after_a_prefill_pays_the_after_prefill_term_once() -> None:
    worker = _worker_with_one_prefilled_prompt()
    # 4 decode steps attending 5, 6, 7 and 8 tokens: 4 ms + 26 x 10 us, and 0.5 ms once
    assert worker.start_step(1e-3) == pytest.approx(1e-3 + 4e-3 + 26e-5 + 5e-4, rel=1e-12)
    result = worker.finish_step()
    assert (result.num_steps, [s.rid for s in result.finished]) == (4, [0])


def test_a_run_cut_after_its_first_step_still_paid_it() -> None:
    worker = _worker_with_one_prefilled_prompt()
    worker.start_step(1e-3)
    # a prompt arrives during the first decode step: the run ends with that step, 1.05 + 0.5 ms
    assert worker.deliver(1.2e-3, Delivery(SimSeq(1, 4, 9, False, None, 0), handoff=False))
    assert worker.end_s == pytest.approx(1e-3 + 1.05e-3 + 5e-4, rel=1e-12)
    assert worker.finish_step().num_steps == 1
    # the next step (the new prompt and a decode row) follows a decode step: no after-prefill term
    assert worker.start_step(worker.end_s) == pytest.approx(2.55e-3 + 1e-3 + 6e-5, rel=1e-12)
