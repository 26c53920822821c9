"""A discrete-event simulation of cache-aware routing over the real scheduler and real block
pools (no model): the harder routing benchmark of issue 20 (`tandem bench routing_zipf`).

What is real: every decision is `tandem.scheduler.routing.route_on` (prefix index, views,
picker, policy, speculative claims); each worker's prefix cache is an engine `BlockPool`
(LRU eviction, the engine's free order), and its STORED/REMOVED events feed the scheduler's
`PrefixIndex` as the KV event follower would, at the moment the prompt finishes. What is
modelled: the compute. A worker runs one prompt at a time, FIFO, for
`overhead_s + uncached_tokens / tokens_per_s`; its cache hit is taken when the prompt starts
(`BlockPool.lookup_prefix`, capped before the last prompt token as the batcher does), and a
prompt that has to queue marks the prefix it would hit most recently used when it arrives
(`BlockPool.refresh`, as `Batcher.add` does). The loads the workers publish are exact at each
decision (a real gateway's are up to a heartbeat old):
waiting prompts count all their tokens, the running one its remaining tokens, as
`worker/load.py` reports them; the scheduler adjusts them with its in-flight table
(inflight.py: its own prompts at their uncached length), which the simulation keeps as
`Scheduler` does (`begin` at routing, `prefill_done` / `decode_done` when a prompt ends).

Per request: arrival (Poisson), route, queue, prefill; TTFT = prefill end - arrival (decode
is not modelled). Workers are colocated decode workers (no prefill pool), so every decision is
the choice of one worker that prefills locally.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from tandem.common.block_hash import block_extra, hash_blocks
from tandem.common.workers import KVEventRecord, WorkerInfo, WorkerLoad, WorkerRole
from tandem.engine.block_pool import BlockPool
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.index import PrefixIndex
from tandem.scheduler.inflight import InflightTable
from tandem.scheduler.policies import make_policy
from tandem.scheduler.registry import RegistrySnapshot
from tandem.scheduler.routing import prefilled_by, route_on, uncached_prefill_tokens
from tandem.scheduler.types import RouteDecision, RouteRequest


@dataclass(frozen=True)
class SimSpec:
    """The workload and the cluster. `cache_groups`: how many groups' prefixes one worker's
    cache holds (plus room for one running prompt)."""

    num_workers: int = 8
    num_groups: int = 64
    zipf_s: float = 1.0
    prefix_tokens: int = 512
    suffix_tokens: int = 64
    block_size: int = 16
    cache_groups: int = 16
    num_requests: int = 4000
    warmup_requests: int = 400  # fill the caches; not counted in any figure
    load: float = 1.0  # arrival rate / the cluster's throughput when no prefix hits
    tokens_per_s: float = 20_000.0
    overhead_s: float = 0.002
    seed: int = 0
    queue_weight: float = SchedulerConfig.queue_weight  # of the prefix-aware cost

    @property
    def prompt_tokens(self) -> int:
        return self.prefix_tokens + self.suffix_tokens

    @property
    def num_pool_blocks(self) -> int:
        per_prompt = -(-self.prompt_tokens // self.block_size)
        return self.cache_groups * (self.prefix_tokens // self.block_size) + per_prompt

    @property
    def arrival_rate_per_s(self) -> float:
        prompt_s = self.overhead_s + self.prompt_tokens / self.tokens_per_s
        return self.load * self.num_workers / prompt_s


@dataclass(frozen=True)
class SimRequest:
    group: int
    arrival_s: float
    token_ids: tuple[int, ...]
    block_hashes: tuple[int, ...]


@dataclass
class _Job:
    index: int
    request: SimRequest
    decision: RouteDecision
    remaining_tokens: int  # what the worker reports as queued for it
    start_s: float = 0.0
    end_s: float = 0.0
    hit_tokens: int = 0
    blocks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    hit_tokens: tuple[int, ...]  # per measured request
    ttft_s: tuple[float, ...]
    mean_queued_tokens: tuple[float, ...]  # per worker: as reported, averaged over the measured decisions
    mean_work_tokens: tuple[float, ...]  # per worker: uncached tokens queued, time-averaged (`_work`)

    @property
    def load_imbalance(self) -> float:
        """max / mean over workers of the time-averaged uncached tokens queued (the work)."""
        return _max_over_mean(self.mean_work_tokens)

    @property
    def reported_imbalance(self) -> float:
        """max / mean over workers of the queued prefill tokens they report (waiting prompts
        at full length), averaged over the measured decisions."""
        return _max_over_mean(self.mean_queued_tokens)


def _max_over_mean(values: tuple[float, ...]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def _work(job: _Job, t0_s: float, t1_s: float) -> float:
    """The integral over [t0_s, t1_s] of the job's uncached tokens left: all of them while it
    waits (arrival to start), then decreasing linearly to 0 while it runs (start to end), as
    `_progress` has it. Token-seconds."""
    uncached = len(job.request.token_ids) - job.hit_tokens
    lo, hi = max(job.request.arrival_s, t0_s), min(job.start_s, t1_s)
    waiting = uncached * (hi - lo) if hi > lo else 0.0
    lo, hi = max(job.start_s, t0_s), min(job.end_s, t1_s)
    if hi <= lo or job.end_s <= job.start_s:
        return waiting
    rate = uncached / (job.end_s - job.start_s)
    return waiting + rate * ((job.end_s - lo) ** 2 - (job.end_s - hi) ** 2) / 2


def _progress(job: _Job, now_s: float) -> int:
    """Tokens of the running prompt computed by `now_s` (chunked prefill progresses linearly)."""
    if not job.end_s or now_s <= job.start_s:
        return 0
    return min(job.remaining_tokens, int(job.remaining_tokens * (now_s - job.start_s) / (job.end_s - job.start_s)))


def make_requests(spec: SimSpec) -> list[SimRequest]:
    """Zipf(`zipf_s`) group popularity, a random system prompt per group, a unique suffix per
    request, Poisson arrivals. Deterministic in `spec.seed`."""
    rng = random.Random(spec.seed)
    prefixes = [[rng.randrange(32_000) for _ in range(spec.prefix_tokens)] for _ in range(spec.num_groups)]
    weights = [1.0 / (g + 1) ** spec.zipf_s for g in range(spec.num_groups)]
    extra = block_extra("sim")
    now_s, requests = 0.0, []
    for group in rng.choices(range(spec.num_groups), weights, k=spec.num_requests):
        now_s += rng.expovariate(spec.arrival_rate_per_s)
        tokens = (*prefixes[group], *(rng.randrange(32_000) for _ in range(spec.suffix_tokens)))
        requests.append(SimRequest(group, now_s, tokens, tuple(hash_blocks(tokens, spec.block_size, extra))))
    return requests


def usable_blocks(num_tokens: int, block_size: int) -> int:
    """Leading blocks a hit may cover: never the block of the last prompt token."""
    return (num_tokens - 1) // block_size


def infinite_cache_hits(spec: SimSpec, requests: list[SimRequest]) -> list[int]:
    """Per request: the tokens one infinite cache shared by all workers would serve (the
    longest run of leading blocks it shares with any earlier request)."""
    seen: set[int] = set()
    hits = []
    for r in requests:
        n = 0
        for h in r.block_hashes[: usable_blocks(len(r.token_ids), spec.block_size)]:
            if h not in seen:
                break
            n += 1
        hits.append(n * spec.block_size)
        seen.update(r.block_hashes)
    return hits


def replicas(spec: SimSpec, requests: list[SimRequest], max_imbalance: float) -> dict[int, int]:
    """Per group: the fewest workers that can serve its share of the requests with no worker
    above `max_imbalance` x the mean load (ceil(share * num_workers / max_imbalance))."""
    counts: dict[int, int] = {}
    for r in requests:
        counts[r.group] = counts.get(r.group, 0) + 1
    return {g: max(1, math.ceil(n / len(requests) * spec.num_workers / max_imbalance)) for g, n in counts.items()}


def capacity_aware_hits(spec: SimSpec, requests: list[SimRequest], max_imbalance: float) -> list[int]:
    """Per request: what an ideal router with these caches could hit while keeping the load
    within `max_imbalance`. It knows each group's share, places group g on `replicas(g)`
    workers, and packs the replicas into the caches (`cache_groups` prefixes per worker; if
    they do not fit, the least popular groups get no hit at all). Each replica misses once,
    on the first request of its group that it serves; then the group's requests hit their
    whole prefix (never more than `infinite_cache_hits`)."""
    copies = replicas(spec, requests, max_imbalance)
    popularity = {g: sum(1 for r in requests if r.group == g) for g in copies}
    slots = spec.num_workers * spec.cache_groups
    placed: set[int] = set()
    for g in sorted(copies, key=lambda g: (-popularity[g], g)):  # most popular first
        if copies[g] <= slots:
            placed.add(g)
            slots -= copies[g]
    seen: dict[int, int] = {}
    prefix_blocks = min(spec.prefix_tokens // spec.block_size, usable_blocks(spec.prompt_tokens, spec.block_size))
    hits = []
    for r, bound in zip(requests, infinite_cache_hits(spec, requests)):
        earlier = seen.get(r.group, 0)
        seen[r.group] = earlier + 1
        hit = prefix_blocks * spec.block_size if r.group in placed and earlier >= copies[r.group] else 0
        hits.append(min(hit, bound))
    return hits


def simulate(spec: SimSpec, requests: list[SimRequest], policy_name: str) -> PolicyResult:
    """Run the requests through `route_on` with `policy_name` and the workers' block pools."""
    config = SchedulerConfig(
        policy=policy_name, block_size=spec.block_size, local_prefill_max_tokens=0, queue_weight=spec.queue_weight
    )
    policy = make_policy(policy_name)
    infos = [
        WorkerInfo(f"d-{i:02d}", WorkerRole.DECODE, f"10.0.0.{i}:7000", "5e1a", spec.num_pool_blocks, "sim")
        for i in range(spec.num_workers)
    ]
    pools = {w.worker_id: BlockPool(spec.num_pool_blocks) for w in infos}
    queues: dict[str, deque[_Job]] = {w.worker_id: deque() for w in infos}
    seqs = dict.fromkeys(pools, 0)
    index = PrefixIndex(config.speculative_ttl_s)
    inflight = InflightTable()  # the gateway's own in-flight work, as `Scheduler` keeps it
    done: list[_Job] = []
    queued_sums = dict.fromkeys(pools, 0.0)

    def publish(worker_id: str) -> None:
        for event in pools[worker_id].take_events():
            seqs[worker_id] += 1
            index.apply(KVEventRecord(worker_id, 1, seqs[worker_id], event.kind, event.block_hashes))

    def start(worker_id: str, job: _Job, now_s: float) -> None:
        pool, r = pools[worker_id], job.request
        hit = pool.lookup_prefix(r.block_hashes[: usable_blocks(len(r.token_ids), spec.block_size)])
        pool.touch(hit)
        job.blocks = hit + pool.allocate(-(-len(r.token_ids) // spec.block_size) - len(hit))
        job.hit_tokens = len(hit) * spec.block_size
        job.start_s = now_s
        job.end_s = now_s + spec.overhead_s + (len(r.token_ids) - job.hit_tokens) / spec.tokens_per_s
        job.remaining_tokens = len(r.token_ids) - job.hit_tokens
        publish(worker_id)  # evictions

    def advance(worker_id: str, now_s: float) -> None:
        """Finish every prompt of the worker that ends by `now_s`, starting the next ones."""
        queue, pool = queues[worker_id], pools[worker_id]
        while queue and queue[0].end_s and queue[0].end_s <= now_s:
            job = queue.popleft()
            for block_id, h in zip(job.blocks, job.request.block_hashes):
                pool.cache_block(block_id, h)
            pool.free(job.blocks[::-1])
            publish(worker_id)
            num_tokens = len(job.request.token_ids)
            uncached = uncached_prefill_tokens(job.decision, num_tokens)
            inflight.prefill_done(prefilled_by(job.decision), uncached, job.end_s, num_tokens)
            inflight.decode_done(job.decision.decode.worker_id, job.end_s)  # decode is not modelled
            done.append(job)
            if queue:
                start(worker_id, queue[0], job.end_s)

    for i, r in enumerate(requests):
        for worker_id in pools:
            advance(worker_id, r.arrival_s)
        loads = {}
        for worker_id, queue in queues.items():
            queued = sum(j.remaining_tokens for j in queue) - (_progress(queue[0], r.arrival_s) if queue else 0)
            if i >= spec.warmup_requests:
                queued_sums[worker_id] += queued
            used = pools[worker_id].num_used_blocks
            loads[worker_id] = WorkerLoad(
                len(queue) - 1 if queue else 0, min(1, len(queue)), queued, used, spec.num_pool_blocks, r.arrival_s
            )
        snapshot = RegistrySnapshot.of(infos, loads, r.arrival_s)
        request = RouteRequest(f"r{i}", len(r.token_ids), r.block_hashes, i)
        decision = route_on(snapshot, index, request, policy, config, r.arrival_s, inflight=inflight)
        target = decision.decode.worker_id
        job = _Job(i, r, decision, len(r.token_ids))
        queues[target].append(job)
        if len(queues[target]) == 1:
            start(target, job, r.arrival_s)
        else:  # queued: its cached prefix is marked most recently used, as `Batcher.add` does
            pool = pools[target]
            pool.refresh(pool.lookup_prefix(r.block_hashes[: usable_blocks(len(r.token_ids), spec.block_size)])[::-1])
    for worker_id in pools:
        advance(worker_id, math.inf)
        pools[worker_id].check_integrity()
        assert pools[worker_id].num_used_blocks == 0, f"{worker_id} leaked blocks"
    measured = sorted((j for j in done if j.index >= spec.warmup_requests), key=lambda j: j.index)
    num_measured = len(requests) - spec.warmup_requests
    t0_s, t1_s = requests[spec.warmup_requests].arrival_s, requests[-1].arrival_s
    work = dict.fromkeys(pools, 0.0)
    for job in done:
        work[job.decision.decode.worker_id] += _work(job, t0_s, t1_s)
    return PolicyResult(
        policy_name,
        tuple(j.hit_tokens for j in measured),
        tuple(j.end_s - j.request.arrival_s for j in measured),
        tuple(queued_sums[w] / max(1, num_measured) for w in pools),
        tuple(work[w] / (t1_s - t0_s) if t1_s > t0_s else 0.0 for w in pools),
    )
