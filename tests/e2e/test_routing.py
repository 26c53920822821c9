"""Routing through a real cluster, read back from the workers' Prometheus metrics: requests
sharing a system prompt are prefilled where it is cached (prefix_aware) and not with
round_robin; a worker that stops heartbeating is not chosen after its TTL."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, HEARTBEAT_TTL_S, Cluster, gateway_metric
from tests.e2e.test_gateway_errors import post
from tests.integration.workers import worker_health, worker_metric

BLOCK = 16
SYSTEM_BLOCKS = 4
SUFFIX = 5
NUM_REQUESTS = 20


def _counters(cluster: Cluster) -> dict[str, tuple[float, float]]:
    """worker id -> (prompt tokens computed, prefix-cache hit tokens) of each prefill worker."""
    return {
        w.name: (
            worker_metric(w, "tandem_prompt_tokens_computed_total"),
            worker_metric(w, "tandem_prefix_cache_hit_tokens_total"),
        )
        for w in cluster.prefill
    }


def _send_shared_prefix(cluster: Cluster, url: str, seed: int) -> dict[str, tuple[float, float]]:
    rng = random.Random(seed)
    system = [rng.randrange(4, 500) for _ in range(SYSTEM_BLOCKS * BLOCK)]
    before = _counters(cluster)
    for _ in range(NUM_REQUESTS):
        prompt = system + [rng.randrange(4, 500) for _ in range(SUFFIX)]
        body = json.dumps(
            {"model": cluster.model_dir.name, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        ).encode()
        status, _, got = post(url, "/v1/completions", body)
        assert status == 200, got
    # Every prompt token is either computed or a cache hit; wait (bounded) until the workers'
    # counters account for all of them, then report the split.
    total = NUM_REQUESTS * (SYSTEM_BLOCKS * BLOCK + SUFFIX)
    deadline = time.monotonic() + 2.0
    while True:
        after = _counters(cluster)
        delta = {wid: (after[wid][0] - before[wid][0], after[wid][1] - before[wid][1]) for wid in after}
        if sum(c + h for c, h in delta.values()) >= total or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def test_prefix_aware_prefills_where_cached(cluster: Cluster) -> None:
    g = cluster.gateway("--policy", "prefix_aware", "--local-prefill-max-tokens", "0")
    try:
        delta = _send_shared_prefix(cluster, g.address, seed=101)
        assert gateway_metric(g, "tandem_routing_decisions_total", kind="disaggregated") == NUM_REQUESTS
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)
    prompt_len = SYSTEM_BLOCKS * BLOCK + SUFFIX
    # One prefill worker took all 20: the first computed the whole prompt, the other 19 hit
    # the 4 cached blocks and computed only their suffix. The other worker did nothing.
    served = sorted(delta.values(), reverse=True)
    assert served == [(prompt_len + (NUM_REQUESTS - 1) * SUFFIX, (NUM_REQUESTS - 1) * SYSTEM_BLOCKS * BLOCK), (0, 0)]
    cluster.assert_drained()


def test_round_robin_ignores_the_cache(cluster: Cluster) -> None:
    g = cluster.gateway("--policy", "round_robin", "--local-prefill-max-tokens", "0")
    try:
        delta = _send_shared_prefix(cluster, g.address, seed=202)
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)
    prompt_len = SYSTEM_BLOCKS * BLOCK + SUFFIX
    # 10 each, alternating: each worker computes the shared prefix once.
    per_worker = (prompt_len + (NUM_REQUESTS // 2 - 1) * SUFFIX, (NUM_REQUESTS // 2 - 1) * SYSTEM_BLOCKS * BLOCK)
    assert sorted(delta.values()) == [per_worker, per_worker]
    cluster.assert_drained()


def test_stale_worker_is_not_chosen(cluster: Cluster) -> None:
    """Freeze prefill-1 (SIGSTOP: no heartbeat, no answers). After its TTL every request goes
    to prefill-0; nothing waits on the frozen worker's prefill timeout."""
    g = cluster.gateway("--policy", "round_robin", "--local-prefill-max-tokens", "0", "--prefill-timeout-s", "5")
    frozen = cluster.prefill[1]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        time.sleep(HEARTBEAT_TTL_S + 0.6)  # TTL, plus one registry refresh and margin
        alive = cluster.prefill[0]
        before = worker_metric(alive, "tandem_prompt_tokens_computed_total")
        start = time.monotonic()
        for i in range(6):
            body = json.dumps(
                {"model": cluster.model_dir.name, "prompt": [7, 8, 9, 10 + i] * 5, "max_tokens": 2, "temperature": 0}
            ).encode()
            status, _, got = post(g.address, "/v1/completions", body)
            assert status == 200, got
        assert time.monotonic() - start < 10.0, g.output_tail()
        after = worker_metric(alive, "tandem_prompt_tokens_computed_total")
        assert after - before == 6 * 20  # all six prompts were computed on prefill-0
        assert gateway_metric(g, "tandem_prefill_retries_total") == 0
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
        g.stop(GATEWAY_STOP_TIMEOUT_S)
    # the thawed worker registers again on its next heartbeat
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and worker_health(frozen).worker_id != "prefill-1":
        time.sleep(0.1)
    cluster.assert_drained()


@pytest.fixture(autouse=True)
def _registered(cluster: Cluster) -> None:
    """Every prefill worker is registered before a routing test starts."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(cluster.redis.url)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(client.exists(f"tandem:default:worker:{w.name}") for w in cluster.workers):
            return
        time.sleep(0.1)
    raise AssertionError("not every worker is registered")
