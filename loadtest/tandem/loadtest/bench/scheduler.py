"""Micro-benchmark of the scheduler's decision path, in memory (no Redis).

Budget (DESIGN.md section 5, issue 20): p99 <= 200 us per decision at 100 workers, for a
4096-token (256 blocks) and a 32768-token (2048 blocks) prompt; hashing a 4096-token prompt
< 100 us. Run it with:

    python -c "from tandem.loadtest.bench.scheduler import run_scheduler_bench; run_scheduler_bench()"

Setup: half prefill and half decode workers with one fingerprint and random loads; a handful
of distinct prompts; every worker holds a random leading prefix of about half of the prompts
(applied as STORED events, as the KV event follower would). Timed per iteration:
- `route`: `routing.route_on`, i.e. exactly what `Scheduler.route` does once it has read its
  snapshot reference: expire, `PrefixIndex.match`, views, `picker.decide`, speculative claims.
  The clock advances 10 ms per request, so after `speculative_ttl_s` claims also expire on
  the timed path, as they do in steady state. The index has recorded the runs of each
  prompt's prefix (runs.py; `RUN_WARMUP_ROUNDS` matches of each prompt first), as it has for
  a prefix routed again and again.
- `route_cold`: the same right after a KV event on every block of the prompt's prefix
  (untimed: the worker that holds the longest part of it stores it again), which drops every
  recorded run of the prompt, so the match walks the whole prompt block by block and records
  the runs again: the cost of the first route of a prefix (or of one whose blocks all just
  changed somewhere).
- `match`: `PrefixIndex.match` alone.
- `hash_blocks`: hashing the whole prompt, which the gateway does once per request before
  routing (not part of the decision budget, reported separately).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from tandem.common.block_hash import block_extra, hash_blocks
from tandem.common.workers import KVEventKind, KVEventRecord, WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.index import PrefixIndex
from tandem.scheduler.policies import make_policy
from tandem.scheduler.registry import RegistrySnapshot
from tandem.scheduler.routing import route_on
from tandem.scheduler.types import RouteRequest

NUM_PROMPTS = 16
WARMUP_ITERATIONS = 100
# Before the timed paths, every prompt is matched this many times: one match records at most
# `index.RECORD_BUDGET_BLOCKS` blocks of runs, so a 32k-token prompt with a run boundary every
# 40 blocks or so needs about 20 matches before its whole prefix is recorded (the steady state
# of a prefix that is routed again and again; `route_cold` times the other end).
RUN_WARMUP_ROUNDS = 32
KV_BLOCKS_TOTAL = 8192
CLOCK_STEP_S = 0.01  # simulated time between two routed requests


def _percentiles_us(samples_ns: list[int]) -> tuple[float, float, float]:
    ordered = sorted(samples_ns)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)]
    return p50 / 1000, p99 / 1000, ordered[-1] / 1000


def _time_ns(fn: Callable[[int], object], iterations: int, prepare: Callable[[int], object] | None = None) -> list[int]:
    """Per-call times of `fn(i)`; `prepare(i)`, if given, runs before each call, untimed."""
    for i in range(WARMUP_ITERATIONS):
        if prepare is not None:
            prepare(i)
        fn(i)
    samples = []
    for i in range(iterations):
        if prepare is not None:
            prepare(i)
        start = time.perf_counter_ns()
        fn(i)
        samples.append(time.perf_counter_ns() - start)
    return samples


def _workers(num_workers: int, rng: random.Random) -> tuple[list[WorkerInfo], dict[str, WorkerLoad]]:
    workers, loads = [], {}
    for i in range(num_workers):
        role = WorkerRole.PREFILL if i % 2 == 0 else WorkerRole.DECODE
        info = WorkerInfo(f"{role.value[0]}-{i // 2:03d}", role, f"10.0.0.{i}:7000", "ab12", KV_BLOCKS_TOTAL, "bench")
        workers.append(info)
        loads[info.worker_id] = WorkerLoad(
            waiting=rng.randint(0, 8),
            running=rng.randint(0, 32),
            queued_prefill_tokens=rng.randint(0, 8192),
            kv_blocks_used=rng.randint(0, KV_BLOCKS_TOTAL),
            kv_blocks_total=KV_BLOCKS_TOTAL,
            timestamp_s=0.0,
        )
    return workers, loads


def run_scheduler_bench(
    num_workers: int = 100, prompt_tokens: int = 4096, iterations: int = 2000, out: Callable[[str], None] = print
) -> dict[str, float]:
    """Time the decision path and prompt hashing; print a table; return the numbers in us."""
    if num_workers < 2 or prompt_tokens < 1 or iterations < 1:
        raise ValueError("need num_workers >= 2, prompt_tokens >= 1 and iterations >= 1")
    rng = random.Random(0)
    config = SchedulerConfig()
    extra = block_extra("bench-model")
    prompts = [[rng.randrange(32_000) for _ in range(prompt_tokens)] for _ in range(NUM_PROMPTS)]
    hashes = [tuple(hash_blocks(p, config.block_size, extra)) for p in prompts]

    workers, loads = _workers(num_workers, rng)
    snapshot = RegistrySnapshot.of(workers, loads, taken_at_s=0.0)
    index = PrefixIndex(config.speculative_ttl_s)
    seqs = dict.fromkeys((info.worker_id for info in workers), 0)
    holders: list[list[tuple[str, int]]] = [[] for _ in hashes]  # per prompt: (worker, blocks held)
    for info in workers:
        for prompt_hashes, held in zip(hashes, holders):
            num_held = rng.randint(1, len(prompt_hashes)) if prompt_hashes else 0
            if rng.random() < 0.5 and num_held:
                seqs[info.worker_id] += 1
                index.apply(
                    KVEventRecord(info.worker_id, 1, seqs[info.worker_id], KVEventKind.STORED, prompt_hashes[:num_held])
                )
                held.append((info.worker_id, num_held))

    policy = make_policy(config.policy)
    for _ in range(RUN_WARMUP_ROUNDS):
        for prompt_hashes in hashes:
            index.match(prompt_hashes, snapshot.worker_ids)
    requests = [
        RouteRequest(f"r{i}", prompt_tokens, hashes[i % NUM_PROMPTS], i) for i in range(iterations + WARMUP_ITERATIONS)
    ]
    clock_s = [1000.0]

    def route(i: int) -> object:
        clock_s[0] += CLOCK_STEP_S
        return route_on(snapshot, index, requests[i], policy, config, clock_s[0])

    def touch_prefix(i: int) -> None:
        """The longest holder of prompt i stores what it holds again (its view does not change)."""
        held = holders[i % NUM_PROMPTS]
        if held:
            worker_id, num_held = max(held, key=lambda h: h[1])
            seqs[worker_id] += 1
            blocks = hashes[i % NUM_PROMPTS][:num_held]
            index.apply(KVEventRecord(worker_id, 1, seqs[worker_id], KVEventKind.STORED, blocks))

    def match(i: int) -> object:
        return index.match(requests[i].block_hashes, snapshot.worker_ids)

    def hash_prompt(i: int) -> object:
        return hash_blocks(prompts[i % NUM_PROMPTS], config.block_size, extra)

    results: dict[str, float] = {}
    rows: list[tuple[str, Callable[[int], object], int, Callable[[int], object] | None]] = [
        ("route", route, iterations, None),
        ("route_cold", route, iterations, touch_prefix),
        ("match", match, iterations, None),
        ("hash_blocks", hash_prompt, iterations, None),
    ]
    out(
        f"scheduler bench: {num_workers} workers, {prompt_tokens}-token prompt "
        f"({prompt_tokens // config.block_size} blocks), policy {config.policy}"
    )
    out(f"{'path':<12} {'n':>6} {'p50 us':>10} {'p99 us':>10} {'max us':>10}")
    for name, fn, n, prepare in rows:
        p50, p99, worst = _percentiles_us(_time_ns(fn, n, prepare))
        results.update({f"{name}_p50_us": p50, f"{name}_p99_us": p99, f"{name}_max_us": worst})
        out(f"{name:<12} {n:>6} {p50:>10.1f} {p99:>10.1f} {worst:>10.1f}")
    return results
