"""Hash parity at registration through a real cluster: decode workers started with another
model id and another block size register, the gateway never routes to them, and `tandem
status` shows them incompatible with why. The gateway's `tandem_routing_mode` goes load_only
-> exact -> degraded (an injected KV event seq gap) -> load_only (the worker is killed and
restarted under the same id before its key expires: its stale index entries are purged at
re-registration) -> exact (it serves again).

Its own Redis and workers (not the session cluster): the refused workers must not disturb
the other end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tandem.common.block_hash import reference_block_hash
from tandem.common.cluster_state import ClusterState
from tandem.common.embedded_redis import EmbeddedRedis
from tandem.launcher.processes import ChildProcess
from tandem.launcher.status import collect
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, gateway_metric, start_gateway
from tests.e2e.test_gateway_errors import post
from tests.integration.workers import REPO_ROOT, STOP_TIMEOUT_S, start_worker, wait_until, worker_health, worker_metric

HEARTBEAT_TTL_S = 60.0  # the good worker's key outlives its restart: it re-registers, never leaves
NUM_REQUESTS = 6
PROMPT_LEN = 40  # 2 full blocks of 16 tokens
WAIT_S = 20.0
MODES = ("exact", "degraded", "load_only")


@dataclass
class Parity:
    redis: EmbeddedRedis
    good: ChildProcess
    other_model: ChildProcess
    other_block: ChildProcess
    gateway: ChildProcess
    model_dir: Path

    def workers(self) -> list[ChildProcess]:
        return [self.good, self.other_model, self.other_block]


@pytest.fixture(scope="module")
def parity(tiny_model_dir: Path) -> Iterator[Parity]:
    server = EmbeddedRedis.start()
    started: list[ChildProcess] = []
    try:
        common = ("--redis", server.url, "--heartbeat-ttl-s", str(HEARTBEAT_TTL_S))
        for worker_id, extra in (
            ("decode-good", ()),
            ("decode-model", ("--model-id", "other-model")),
            ("decode-block", ("--block-size", "32")),
        ):
            started.append(start_worker("decode", tiny_model_dir, *common, *extra, worker_id=worker_id))
        gateway = start_gateway(tiny_model_dir, server.url)
        started.append(gateway)
        yield Parity(server, started[0], started[1], started[2], gateway, tiny_model_dir)
    finally:
        for child in reversed(started):
            child.stop(GATEWAY_STOP_TIMEOUT_S if child.name == "gateway" else STOP_TIMEOUT_S)
        server.stop()


def routing_mode(parity: Parity) -> dict[str, float]:
    return {m: gateway_metric(parity.gateway, "tandem_routing_mode", mode=m) for m in MODES}


def wait_mode(parity: Parity, mode: str) -> None:
    expected = {m: 1.0 if m == mode else 0.0 for m in MODES}
    assert wait_until(lambda: routing_mode(parity) == expected, WAIT_S), routing_mode(parity)


def served_tokens(worker: ChildProcess) -> float:
    """Prompt tokens the worker computed or found cached: every prompt it prefilled."""
    return worker_metric(worker, "tandem_prompt_tokens_computed_total") + worker_metric(
        worker, "tandem_prefix_cache_hit_tokens_total"
    )


def send(parity: Parity, seed: int) -> None:
    for i in range(NUM_REQUESTS):
        prompt = [4 + (seed * 131 + i * 17 + j) % 400 for j in range(PROMPT_LEN)]
        body = {"model": parity.model_dir.name, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        status, _, got = post(
            parity.gateway.address, "/v1/completions", json.dumps({**body, "ignore_eos": True}).encode()
        )
        assert status == 200, got


def last_event(client: redis.Redis, worker_id: str) -> tuple[int, int]:
    """(epoch, seq) of the worker's newest KV event in the stream."""
    for _, fields in client.xrevrange("tandem:default:kv_events"):
        if fields[b"worker"] == worker_id.encode():
            return int(fields[b"epoch"]), int(fields[b"seq"])
    raise AssertionError(f"no kv event of {worker_id}")


def assert_idle(worker: ChildProcess) -> None:
    def idle() -> bool:
        h = worker_health(worker)
        return not (h.waiting or h.running or h.held_leases or h.free_blocks != h.total_blocks)

    assert wait_until(idle, WAIT_S), worker_health(worker)


def test_incompatible_workers_are_never_routed_to_and_status_says_why(parity: Parity) -> None:
    assert wait_until(lambda: gateway_metric(parity.gateway, "tandem_workers") == 1, WAIT_S)
    wait_mode(parity, "load_only")  # nothing cached anywhere yet
    send(parity, seed=1)
    assert served_tokens(parity.good) == NUM_REQUESTS * PROMPT_LEN
    assert (served_tokens(parity.other_model), served_tokens(parity.other_block)) == (0, 0)
    wait_mode(parity, "exact")
    assert gateway_metric(parity.gateway, "tandem_workers") == 1

    ours = reference_block_hash(parity.model_dir.name, 16)
    why_model = (
        f"model_id (ours {parity.model_dir.name!r}, theirs 'other-model'), "
        f"reference block hash (ours 0x{ours:016x}, theirs 0x{reference_block_hash('other-model', 16):016x})"
    )
    why_block = (
        "block_size (ours 16, theirs 32), "
        f"reference block hash (ours 0x{ours:016x}, theirs 0x{reference_block_hash(parity.model_dir.name, 32):016x})"
    )
    client = parity.redis.client(socket_timeout=2.0)
    try:
        state = ClusterState(client, "default")
        # The gateway publishes its view on its next registry refresh (every 0.25 s).
        assert wait_until(
            lambda: [(g.routing_mode, g.refused) for g in collect(state, "default").gateways] == [("exact", 2)], WAIT_S
        )
        status = collect(state, "default")
    finally:
        client.close()
    assert [(w.worker_id, w.incompatible) for w in status.workers] == [
        ("decode-block", why_block),
        ("decode-good", None),
        ("decode-model", why_model),
    ]
    # The command a user runs prints the same.
    env = {**os.environ, "HOME": str(parity.model_dir.parent), "TANDEM_CACHE_DIR": str(parity.model_dir.parent)}
    result = subprocess.run(
        [sys.executable, "-m", "tandem", "status", "--redis-url", parity.redis.url],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[-1] for line in lines[3:6]] == ["incompatible", "ok", "incompatible"]
    assert lines[6:9] == ["", f"incompatible decode-block: {why_block}", f"incompatible decode-model: {why_model}"]
    assert lines[-1].split()[1:] == ["exact", "2"]
    assert_idle(parity.good)


def test_routing_mode_degrades_on_a_seq_gap_and_a_restart_purges_the_stale_entries(parity: Parity) -> None:
    wait_mode(parity, "exact")
    client = parity.redis.client(socket_timeout=2.0)
    try:
        epoch, seq = last_event(client, "decode-good")
        fields = {
            "worker": "decode-good",
            "epoch": str(epoch),
            "seq": str(seq + 2),  # seq + 1 was "lost"
            "kind": "stored",
            "hashes": (12345).to_bytes(8, "little"),
        }
        client.xadd("tandem:default:kv_events", fields)  # type: ignore[arg-type]
    finally:
        client.close()
    wait_mode(parity, "degraded")

    # Killed and restarted under the same id, before its key expires: it registers a new KV
    # epoch and has cached nothing yet, so the gateway's index must hold nothing for it.
    os.kill(parity.good.pid, signal.SIGKILL)
    parity.good.stop(STOP_TIMEOUT_S)
    common = ("--redis", parity.redis.url, "--heartbeat-ttl-s", str(HEARTBEAT_TTL_S))
    parity.good = start_worker("decode", parity.model_dir, *common, worker_id="decode-good")
    wait_mode(parity, "load_only")
    assert gateway_metric(parity.gateway, "tandem_workers") == 1  # it never left the registry

    send(parity, seed=2)
    assert served_tokens(parity.good) == NUM_REQUESTS * PROMPT_LEN
    wait_mode(parity, "exact")
    assert_idle(parity.good)
