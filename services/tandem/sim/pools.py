"""The simulated workers of both pools: which exist, which take requests, which are draining.

Lifecycle of a worker: `add` (routable at once, or after a start-up delay: `mark_up`), then,
when the autoscaler shrinks its pool, `drain` (it takes no new request at once) and `retire`
when its last sequence is done. Owner: the event loop (cluster.py).
"""

from __future__ import annotations

from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import CostModel
from tandem.sim.worker import SimWorker

FINGERPRINT = "51"  # every simulated worker has the same KV layout


class Pools:
    def __init__(self, step: StepModelConfig, cost: CostModel, prefill_cost: CostModel | None = None) -> None:
        self.step, self.cost = step, cost
        self.prefill_cost = prefill_cost or cost  # the prefill workers' (e.g. another tp degree)
        self.workers: dict[str, SimWorker] = {}  # started and not retired
        self.routable: dict[WorkerRole, list[SimWorker]] = {role: [] for role in WorkerRole}
        self.retired: list[SimWorker] = []
        self._next_id = dict.fromkeys(WorkerRole, 0)

    def add(self, role: WorkerRole, up_at_s: float) -> SimWorker:
        """A new worker of `role`, up at `up_at_s`; routable now if that is not in the future
        (else the caller calls `mark_up` then)."""
        n = self._next_id[role]
        self._next_id[role] = n + 1
        cfg = self.step
        info = WorkerInfo(f"{role.value}-{n:04d}", role, "sim:0", FINGERPRINT, cfg.num_blocks, "sim", cfg.block_size)
        worker = SimWorker(info, cfg, self.prefill_cost if role is WorkerRole.PREFILL else self.cost, up_at_s)
        self.workers[info.worker_id] = worker
        if up_at_s <= 0.0:
            self.routable[role].append(worker)
        return worker

    def mark_up(self, worker: SimWorker) -> None:
        if not worker.draining:
            self.routable[worker.info.role].append(worker)

    def size(self, role: WorkerRole) -> int:
        """Replicas the actuator would report: started or starting, not draining."""
        return sum(1 for w in self.workers.values() if w.info.role is role and not w.draining)

    def loads(self, role: WorkerRole, now_s: float) -> dict[str, WorkerLoad | None]:
        """The published loads of the pool's registered (routable) workers."""
        return {w.worker_id: w.load(now_s) for w in self.routable[role]}

    def shrink(self, role: WorkerRole, count: int, now_s: float) -> list[SimWorker]:
        """Drain `count` workers of `role`: those not up yet first, then the newest. Returns
        the ones that were idle and left at once."""
        pool = [w for w in self.workers.values() if w.info.role is role and not w.draining]
        pool.sort(key=lambda w: (w.up_since_s > now_s, w.worker_id), reverse=True)
        left = []
        for worker in pool[:count]:
            worker.draining = True
            if worker in self.routable[role]:
                self.routable[role].remove(worker)
            if worker.idle:
                self.retire(now_s, worker)
                left.append(worker)
        return left

    def retire(self, now_s: float, worker: SimWorker) -> None:
        worker.down_at_s = max(now_s, worker.up_since_s)
        del self.workers[worker.worker_id]
        self.retired.append(worker)

    def everyone(self, end_s: float) -> list[SimWorker]:
        """Every worker ever started, those still up marked down at `end_s`."""
        for worker in self.workers.values():
            worker.down_at_s = end_s
        return list(self.workers.values()) + self.retired
