"""One simulated worker: its step model, its clock, and the decode runs it skips ahead through.

Lifecycle of a step (owner: the event loop in cluster.py):
1. `deliver(now, item)`: a sequence arrives (a prompt to prefill, or a pulled hand-off). Like the
   real worker's inbox, it is taken in only between steps: an idle worker takes it at once and
   the caller starts a step; a busy one keeps it until its step ends. A worker in the middle of
   a decode run cuts the run at the end of the step in progress (`truncate`), so the arrival
   joins the next step exactly as it would on a real worker.
2. `start_step(now)`: plans a step, asks the cost model how long it takes, and returns its end
   time (None: nothing to do). A pure decode batch becomes a run of `StepModel.decode_run`
   steps, timed by a line through the first and last step's cost (exact for a cost affine in
   the context length; the roofline's max of two lines is convex, so the error is the gap
   between a chord and the curve, small over one run).
3. `finish_step()`: applies the step (or the whole run) and returns what happened.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.common.workers import WorkerInfo, WorkerLoad
from tandem.sim.legacy_vllm import LEGACY_VLLM, LegacyVllmStepModel
from tandem.sim.sequence import Plan, SimSeq
from tandem.sim.stepmodel import StepModel, StepModelConfig
from tandem.sim.types import CostModel, StepShape


@dataclass(frozen=True, slots=True)
class Delivery:
    """A sequence for this worker: to prefill (`add`), or a pulled hand-off (`reserve`)."""

    seq: SimSeq
    handoff: bool


@dataclass(frozen=True, slots=True)
class StepResult:
    sampled: list[SimSeq]
    finished: list[SimSeq]
    stored: list[tuple[int, int, int]]
    num_steps: int


class SimWorker:
    """A worker of one role; `info` is what it would register in Redis."""

    def __init__(self, info: WorkerInfo, config: StepModelConfig, cost: CostModel, up_since_s: float) -> None:
        self.info = info
        self.model = LegacyVllmStepModel(config) if config.planner == LEGACY_VLLM else StepModel(config)
        self.cost = cost
        self.inbox: list[Delivery] = []
        self.draining = False
        self.up_since_s = up_since_s
        self.down_at_s: float | None = None
        self.busy_s = 0.0
        self.version = 0  # bumped when the pending step-end event is replaced
        self.kv_event_seq = 0
        self.expected = 0  # hand-offs routed here whose prompt is still on a prefill worker
        self._plan: Plan | None = None
        self._start_s = 0.0
        self._steps = 1
        self._first_s = 0.0  # duration of the first step of the run
        self._slope_s = 0.0  # growth of the step duration per step of the run
        self.end_s = 0.0

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def busy(self) -> bool:
        return self._plan is not None

    @property
    def idle(self) -> bool:
        """Nothing running, queued, in the inbox, on its way, or held for a pull (a draining
        worker can leave: it has finished its streams and released its leases)."""
        m = self.model
        return self._plan is None and not self.inbox and not m.has_work and not self.expected and not m.num_used_blocks

    def load(self, now_s: float) -> WorkerLoad:
        m = self.model
        return WorkerLoad(
            len(m.waiting) + len(m.ready) + len(self.inbox),
            len(m.running),
            m.queued_prefill_tokens() + sum(d.seq.num_new for d in self.inbox if not d.handoff),
            m.num_used_blocks,
            m.config.num_blocks,
            now_s,
        )

    def deliver(self, now_s: float, delivery: Delivery) -> bool:
        """Take a sequence (step 1 of the module docstring). True if the caller must reschedule
        this worker's step end (`end_s` moved earlier; `version` was bumped)."""
        if self._plan is None:
            self._take(delivery)
            return False
        self.inbox.append(delivery)
        return self.truncate(now_s)

    def truncate(self, now_s: float) -> bool:
        """Cut a decode run at the end of the step in progress at `now_s`. True if it moved."""
        if self._steps <= 1:
            return False
        elapsed = now_s - self._start_s
        low, high = 1, self._steps  # the first j whose end is at or after now
        while low < high:
            mid = (low + high) // 2
            if self._run_seconds(mid) >= elapsed:
                high = mid
            else:
                low = mid + 1
        if low >= self._steps:
            return False
        self._steps = low
        self.end_s = self._start_s + self._run_seconds(low)
        self.version += 1
        return True

    def start_step(self, now_s: float) -> float | None:
        """Plan the next step (module docstring, step 2); its end time, or None when idle."""
        for delivery in self.inbox:
            self._take(delivery)
        self.inbox.clear()
        if not self.model.has_work:
            return None
        plan = self.model.schedule()
        if not plan.chunks:
            return None  # everything queued waits for blocks that no running sequence will free
        shape = plan.shape()
        steps = self.model.decode_run(plan)
        first_s = self.cost.step_seconds(shape)
        slope_s = 0.0
        if steps > 1:
            n = shape.decode_seqs
            last = StepShape(decode_seqs=n, decode_context_tokens=shape.decode_context_tokens + (steps - 1) * n)
            slope_s = (self.cost.step_seconds(last) - first_s) / (steps - 1)
        self._plan, self._start_s, self._steps = plan, now_s, steps
        self._first_s, self._slope_s = first_s, slope_s
        self.end_s = now_s + self._run_seconds(steps)
        self.version += 1
        return self.end_s

    def finish_step(self) -> StepResult:
        """Apply the planned step, or the run cut to `_steps` steps."""
        plan = self._plan
        assert plan is not None, "finish_step without a step in flight"
        sampled, finished, stored = self.model.update(plan)
        finished += self.model.advance_decode(plan, self._steps)
        self.busy_s += self.end_s - self._start_s
        self._plan = None
        return StepResult(sampled, finished, stored, self._steps)

    def _run_seconds(self, steps: int) -> float:
        return steps * self._first_s + self._slope_s * steps * (steps - 1) / 2

    def _take(self, delivery: Delivery) -> None:
        if not delivery.handoff or not self.model.reserve(delivery.seq):
            seq = delivery.seq
            seq.num_computed = 0
            self.model.add(seq)
