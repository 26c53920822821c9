"""A Redis outage under traffic, on a real cluster (1 prefill + 2 decode workers, heartbeat TTL
2 s, a gateway with rate limits on): Redis is frozen (SIGSTOP) for longer than the TTL, then
killed (SIGKILL) and restarted empty on its port. Every request sent meanwhile is served (an
exact count, none fails), the rate limiter fails open and counts it, the workers register
again in the new Redis and republish their block sets under new epochs, and a gateway started
afterwards routes a cached prompt with its full prefix hit: the index was rebuilt with no
manual step. The pools end drained."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tandem.common.cluster_state import ClusterState
from tandem.common.embedded_redis import EmbeddedRedis
from tandem.common.workers import KVEventKind
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, HEARTBEAT_TTL_S, Cluster, gateway_metric
from tests.e2e.test_gateway_errors import post
from tests.integration.workers import wait_until

pytestmark = pytest.mark.slow

BLOCK = 16
SYSTEM_BLOCKS = 4
FREEZE_S = 2 * HEARTBEAT_TTL_S  # every worker key expires during it
DOWN_S = 2.0  # killed Redis stays down this long before it is restarted
AFTER_S = 2.0  # traffic after each outage ends


def body(model: str, prompt: list[int]) -> bytes:
    return json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    ).encode()


class Traffic:
    """Sequential completions; each status is kept."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.rng = random.Random(7)
        self.statuses: list[int] = []
        self.errors: list[str] = []

    def send_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            # shorter than a block, even with its 2 output tokens: the traffic caches nothing, so
            # however many requests this machine sends, the system prompt is never evicted
            prompt = [self.rng.randrange(4, 500) for _ in range(BLOCK - 4)]
            status, _, got = post(self.url, "/v1/completions", body(self.model, prompt))
            self.statuses.append(status)
            if status != 200:
                self.errors.append(f"{status}: {got}")


def test_redis_freeze_and_kill_mid_traffic(tiny_model_dir: Path, tmp_path: Path) -> None:
    cluster = Cluster.start(tiny_model_dir, tmp_path / "spans.jsonl", num_prefill=1, num_decode=2)
    gateways = []
    try:
        g = cluster.gateway("--local-prefill-max-tokens", "0", "--rate-limit-rpm", "100000")
        gateways.append(g)
        model = cluster.model_dir.name
        system = [random.Random(3).randrange(4, 500) for _ in range(SYSTEM_BLOCKS * BLOCK)]
        status, _, got = post(g.address, "/v1/completions", body(model, system + [9, 9, 9]))
        assert status == 200, got
        traffic = Traffic(g.address, model)
        traffic.send_for(1.0)

        # 1. Freeze, longer than the workers' TTL: their keys expire on resume.
        outage_ns = time.time_ns()  # every epoch of a resync is later (kv_events.py)
        os.kill(cluster.redis.pid, signal.SIGSTOP)
        try:
            traffic.send_for(FREEZE_S)
        finally:
            os.kill(cluster.redis.pid, signal.SIGCONT)
        traffic.send_for(AFTER_S)
        assert gateway_metric(g, "tandem_rate_limit_fail_open_total") >= 1

        # 2. Kill, then restart empty on the same port.
        port = cluster.redis.port
        os.kill(cluster.redis.pid, signal.SIGKILL)
        cluster.redis.stop()  # reaps it and deletes its directory
        traffic.send_for(DOWN_S)
        cluster.redis = EmbeddedRedis.start(port=port)
        traffic.send_for(AFTER_S)

        assert traffic.errors == []
        assert traffic.statuses == [200] * len(traffic.statuses) and len(traffic.statuses) >= 10

        # 3. Everything registered again, and every worker republished under a new epoch.
        state = ClusterState(cluster.redis.client(socket_timeout=2.0), "default")
        names = sorted(w.name for w in cluster.workers)
        assert wait_until(lambda: sorted(w.worker_id for w in state.list_workers()) == names, 10.0)

        def resynced() -> set[str]:
            records = state.read_kv_events("0-0", count=10_000)[0]
            return {r.worker_id for r in records if r.kind is KVEventKind.CLEARED and r.epoch > outage_ns}

        assert wait_until(lambda: resynced() == set(names), 10.0)

        # 4. A gateway started now knows only the new stream: the cached system prompt is a hit.
        g2 = cluster.gateway("--local-prefill-max-tokens", "0")
        gateways.append(g2)
        for gw in (g, g2):
            hits = gateway_metric(gw, "tandem_prefix_cache_hit_tokens_total")
            status, _, got = post(gw.address, "/v1/completions", body(model, system + [7, 7, 7]))
            assert status == 200, got
            assert gateway_metric(gw, "tandem_prefix_cache_hit_tokens_total") - hits == SYSTEM_BLOCKS * BLOCK
        assert "Traceback" not in "".join(w.output_tail() for w in cluster.workers)
        cluster.assert_drained(timeout_s=10.0)
    finally:
        for gw in gateways:
            gw.stop(GATEWAY_STOP_TIMEOUT_S)
        cluster.stop()
