"""The simulated cluster: its decisions are the real scheduler's and autoscaler's, and a run is
deterministic.

The replay tests record, during a simulation, every registry refresh (the workers and their
loads), KV event, route, prefill/decode completion and autoscaler step, then feed the same
sequence of cluster states to the gateway's real `Scheduler` and to the real `Autoscaler`
(through a stand-in for the Redis-backed `ClusterState` that returns the recorded workers and
loads) and check that they choose the same workers and the same replica counts.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, cast

import pytest

from tandem.autoscaler.autoscaler import Autoscaler
from tandem.autoscaler.config import AutoscalerConfig, DecodePolicy, PrefillPolicy
from tandem.autoscaler.metrics import AutoscalerMetrics
from tandem.common.cluster_state import ClusterState
from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.scheduler import Scheduler
from tandem.sim.cluster import ClusterConfig, ClusterSim
from tandem.sim.results import Slo
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import StepShape, TraceRequest


class AffineCost:
    """A test double: a step costs a fixed overhead plus per-token and per-context terms."""

    def step_seconds(self, step: StepShape) -> float:
        return 0.004 + 2e-5 * step.prefill_tokens + 1e-4 * step.decode_seqs + 2e-7 * step.decode_context_tokens

    def transfer_seconds(self, nbytes: int) -> float:
        return 0.002 + nbytes / 5e9

    def kv_bytes_per_token(self) -> int:
        return 65536


def trace(num: int, rate_rps: float, seed: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.expovariate(rate_rps)
        group = rng.randrange(3) if rng.random() < 0.5 else None
        out.append(TraceRequest(t, rng.randint(40, 900), rng.randint(2, 120), group, 256 if group is not None else 0))
    return out


class RecordedState:
    """Stands in for `ClusterState`: the workers and loads of the recorded moment."""

    key_prefix = "tandem:sim:"
    socket_timeout_s = None

    def __init__(self) -> None:
        self.seen: tuple[tuple[WorkerInfo, WorkerLoad], ...] = ()

    def list_workers(self, role: WorkerRole | None = None) -> list[WorkerInfo]:
        return [info for info, _ in self.seen if role is None or info.role is role]

    def get_loads(self, worker_ids: Any) -> dict[str, WorkerLoad | None]:
        loads = {info.worker_id: load for info, load in self.seen}
        return {w: loads.get(w) for w in worker_ids}


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class RecordedActuator:
    name = "recorded"

    def __init__(self) -> None:
        self.current: dict[WorkerRole, int] = {}

    def replicas(self, role: WorkerRole) -> int:
        return self.current[role]

    def scale(self, role: WorkerRole, replicas: int) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize(("vectorised", "num_prefill", "num_decode"), [(False, 3, 4), (True, 3, 4), (True, 12, 28)])
def test_routes_equal_the_real_scheduler(vectorised: bool, num_prefill: int, num_decode: int) -> None:
    """Both routers (router.py): the gateway's own `route_on`, and its numpy equal."""
    scheduler_config = SchedulerConfig(local_prefill_max_tokens=300, speculative_ttl_s=0.5)
    config = ClusterConfig(
        num_prefill, num_decode, StepModelConfig(num_blocks=2000), scheduler_config, vectorised_routing=vectorised
    )
    sim = ClusterSim(config, AffineCost(), trace(600, 120.0 * (num_prefill + num_decode) / 7, seed=3), record=True)
    result = sim.run()
    assert sim.log is not None
    state, clock = RecordedState(), Clock()
    scheduler = Scheduler(cast(ClusterState, state), scheduler_config, clock)
    index = scheduler._index  # the follower thread feeds it from Redis; here the recorded events do
    routes = 0
    for kind, now_s, what, decision in sim.log:
        clock.now_s = now_s
        if kind == "refresh":
            state.seen = what
            scheduler.refresh_now()
        elif kind == "kv":
            index.apply(what)
        elif kind == "route":
            assert scheduler.route(what) == decision, f"request {what.request_id} at {now_s}"
            routes += 1
        elif kind == "prefill_done":
            scheduler.prefill_done(what, decision)
        elif kind == "decode_done":
            scheduler.decode_done(what)
    assert routes == 600 == result.num_completed
    # both routing kinds and prefix hits occurred, so the replay covers the whole rule
    assert result.num_disaggregated > 0 and result.num_local_prefill > 0
    assert any(e[0] == "kv" for e in sim.log)


def test_scale_decisions_equal_the_real_autoscaler() -> None:
    autoscaler = AutoscalerConfig(
        prefill=PrefillPolicy(min_replicas=1, max_replicas=6, target_queued_tokens_per_replica=600),
        decode=DecodePolicy(min_replicas=1, max_replicas=6, target_waiting_per_replica=1.0),
        interval_s=0.5,
        stabilisation_window_s=2.0,
        up_cooldown_s=1.0,
        down_cooldown_s=1.0,
        max_signal_age_s=1.0,
    )
    rates = trace(300, 200.0, seed=5) + [
        dataclasses.replace(r, arrival_s=r.arrival_s + 6.0) for r in trace(60, 10.0, seed=6)
    ]
    config = ClusterConfig(1, 1, StepModelConfig(num_blocks=4000), autoscaler=autoscaler, startup_s=0.3)
    sim = ClusterSim(config, AffineCost(), rates, record=True)
    result = sim.run()
    assert sim.log is not None
    state, clock, actuator = RecordedState(), Clock(), RecordedActuator()
    real = Autoscaler(cast(ClusterState, state), actuator, autoscaler, AutoscalerMetrics(), clock)
    steps = 0
    for kind, now_s, what, decisions in sim.log:
        if kind != "scale":
            continue
        clock.now_s = now_s
        state.seen, actuator.current = what
        assert real.step() == list(decisions), f"autoscaler step at {now_s}"
        steps += 1
    ups = [entry for entry in sim.scale_log if entry[3] > entry[2]]
    downs = [entry for entry in sim.scale_log if entry[3] < entry[2]]
    assert steps > 10 and ups and downs  # the load rose and fell: both directions replayed
    assert result.num_completed == 360


def test_deterministic_for_a_seed() -> None:
    def run(seed: int) -> Any:
        config = ClusterConfig(2, 3, StepModelConfig(num_blocks=3000), slo=Slo(0.2, 0.02))
        sim = ClusterSim(config, AffineCost(), trace(400, 150.0, seed))
        return sim.run(), list(sim.records.first_token_s), list(sim.records.finish_s)

    first, second, other = run(11), run(11), run(12)
    assert first == second  # every field of the result and every request's times, exactly
    assert first[1] != other[1]
    assert first[0].num_completed == 400


def test_scaling_with_hand_offs_in_flight_drains_every_worker() -> None:
    """Bursts and lulls make the autoscaler grow and shrink both pools (prefill down to 0)
    while prompts are on prefill workers and KV is on its way: every request completes, no
    worker leaves with work or blocks, and every pool ends empty."""
    autoscaler = AutoscalerConfig(
        prefill=PrefillPolicy(min_replicas=0, max_replicas=6, target_queued_tokens_per_replica=300),
        decode=DecodePolicy(min_replicas=1, max_replicas=6, target_waiting_per_replica=0.5),
        interval_s=0.2,
        stabilisation_window_s=0.5,
        up_cooldown_s=0.2,
        down_cooldown_s=0.2,
        max_signal_age_s=1.0,
    )
    rng = random.Random(0)
    requests, t = [], 0.0
    for i in range(800):
        t += rng.expovariate(300.0 if (i // 100) % 2 == 0 else 5.0)
        requests.append(TraceRequest(t, rng.randint(20, 900), rng.choice([1, 2, 50, 200])))
    config = ClusterConfig(2, 2, StepModelConfig(num_blocks=1500), autoscaler=autoscaler, startup_s=0.1)
    sim = ClusterSim(config, AffineCost(), requests)
    result = sim.run()
    assert result.num_completed == 800
    downs = [entry for entry in sim.scale_log if entry[3] < entry[2]]
    assert len(downs) > 3 and result.num_preemptions > 0
    assert [(p.role, p.num_workers_end) for p in result.pools] == [("prefill", 0), ("decode", 1)]
    for worker in [*sim.pools.workers.values(), *sim.pools.retired]:
        assert worker.idle, worker.worker_id
        assert worker.model.num_free_blocks == 1500, worker.worker_id
