"""Hostile values in Redis do not crash a gateway, and never route it anywhere but to the real,
registered workers (issue 16, deliverable 4).

A cluster of its own (embedded Redis on a free port, one prefill and one decode worker, a
gateway). Into its Redis go: worker entries that are malformed in every way, several naming
the address of a trap socket that counts the connections it gets; a key of the wrong Redis
type under `worker:` and `load:`; malformed load hashes; and KV events that are malformed or
that claim an unregistered worker holds exactly the blocks of the prompts sent next. Then the
gateway serves every request exactly, through the real prefill and decode worker (counted on
each), the trap is never dialed, its registry view holds the two workers, and it logged no
traceback.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tandem.common.block_hash import block_extra, hash_blocks
from tandem.engine import Engine, SamplingParams
from tests.conftest import random_prompts
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster, gateway_metric
from tests.integration.workers import wait_until, worker_metric

PREFIX = "tandem:default:"
NUM_REQUESTS = 4
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class Trap:
    """A loopback listener that counts the connections it accepts (and closes them)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def hostile(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, object, Trap]]:
    cluster = Cluster.start(tiny_model_dir, tmp_path_factory.mktemp("hostile") / "spans.jsonl", 1, 1)
    trap = Trap()
    try:
        gateway = cluster.gateway("--local-prefill-max-tokens", "0")
        try:
            yield cluster, gateway, trap
        finally:
            gateway.stop(GATEWAY_STOP_TIMEOUT_S)
    finally:
        trap.close()
        cluster.stop()


def _worker_fields(address: str, **overrides: str | bytes) -> dict[str, str | bytes]:
    fields: dict[str, str | bytes] = {
        "role": "decode",
        "address": address,
        "fingerprint": "ab12",
        "capacity_blocks": "1000",
        "version": "0.1.0",
        "block_size": "16",
        "model_id": "tiny",
        "block_hash_version": "1",
    }
    fields.update(overrides)
    return fields


def _write_hostile_values(cluster: Cluster, trap: Trap, prompts: list[list[int]], model_id: str) -> None:
    client = cluster.redis.client()
    try:
        malformed = {
            "trap-fingerprint": _worker_fields(trap.address, fingerprint="NOT-HEX"),
            "trap-role": _worker_fields(trap.address, role="router"),
            "trap-capacity": _worker_fields(trap.address, capacity_blocks="-1"),
            "trap-block-size": _worker_fields(trap.address, block_size="0"),
            "trap-huge-int": _worker_fields(trap.address, capacity_blocks="9" * 5000),
            "trap-utf8": _worker_fields(trap.address, role=b"\xff\xfe"),
            "trap-unix": _worker_fields("unix:/tmp/tandem-trap.sock"),
            "trap-dns": _worker_fields(f"dns:///{trap.address}"),
            "trap-port": _worker_fields("127.0.0.1:99999"),
            "bad*id": _worker_fields(trap.address),
            "x" * 300: _worker_fields(trap.address),
        }
        for worker_id, fields in malformed.items():
            client.hset(PREFIX + "worker:" + worker_id, mapping=fields)  # type: ignore[arg-type]
        client.set(PREFIX + "worker:trap-string", trap.address)
        client.rpush(PREFIX + "worker:trap-list", trap.address)
        client.hset(PREFIX + "load:trap-fingerprint", mapping={"waiting": "-5", "running": "nan"})
        client.set(PREFIX + "load:trap-string", "0")
        stream = PREFIX + "kv_events"
        extra = block_extra(model_id)
        for i, prompt in enumerate(prompts):  # an unregistered worker "holds" every prompt's blocks
            hashes = hash_blocks(prompt, 16, extra)
            packed = struct.pack(f"<{len(hashes)}Q", *hashes)
            event = {"worker": "ghost", "epoch": "1", "seq": str(i + 1), "kind": "stored", "hashes": packed}
            client.xadd(stream, event)  # type: ignore[arg-type]
        good = {"worker": "ghost", "epoch": "1", "seq": "99", "kind": "stored", "hashes": struct.pack("<Q", 7)}
        for bad in (
            {**good, "hashes": b"\x01" * 7},
            {**good, "kind": "evil"},
            {**good, "epoch": "-1"},
            {**good, "seq": "9" * 5000},
            {**good, "worker": "../../etc"},
            {**good, "worker": b"\xff"},
            {"junk": "1"},
        ):
            client.xadd(stream, bad)  # type: ignore[arg-type]
        client.xadd(stream, {**good, "hashes": struct.pack("<Q", 7) * 100_000})  # an 800 kB event
    finally:
        client.close()


def test_hostile_redis_values_do_not_crash_or_misroute_a_gateway(hostile, tiny_model_dir: Path) -> None:
    cluster, gateway, trap = hostile
    (prefill_w,), (decode_w,) = cluster.prefill, cluster.decode
    prompts = random_prompts([40, 48, 33, 64], 512, seed=164)
    model_id = tiny_model_dir.name
    _write_hostile_values(cluster, trap, prompts, model_id)
    # The registry refresher has read them (and said so, once) before any request is sent.
    assert wait_until(lambda: "skipping malformed worker entry" in gateway.output_tail(), 10.0)
    leases_before = worker_metric(prefill_w, "tandem_leases_granted_total")
    pulls_before = worker_metric(decode_w, "tandem_kv_transfer_seconds_count")
    reference = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    for prompt in prompts[:NUM_REQUESTS]:
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
        response = httpx.post(gateway.address + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        expected = list(reference.generate([prompt], GREEDY)[0].token_ids)
        assert response.json()["choices"][0]["token_ids"] == expected
    assert worker_metric(prefill_w, "tandem_leases_granted_total") - leases_before == NUM_REQUESTS
    assert worker_metric(decode_w, "tandem_kv_transfer_seconds_count") - pulls_before == NUM_REQUESTS
    assert trap.accepted == 0
    assert gateway_metric(gateway, "tandem_workers") == 2
    assert httpx.get(gateway.address + "/ready", timeout=10).status_code == 200
    assert gateway.is_running
    log = gateway.output_tail()
    assert "Traceback" not in log
    assert "retrying with backoff" not in log  # a hostile key is not a Redis outage
    cluster.assert_drained(timeout_s=10.0)
