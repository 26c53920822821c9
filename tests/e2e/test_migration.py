"""Mid-stream migration and scale-down under streaming (issue 15, deliverables 1 and 3).

These tests kill and drain decode workers, so they run on a cluster of their own: embedded
Redis, one prefill worker and a gateway for the module; decode workers are started per test.
Each streaming request is compared with an unbroken run of the same request: token ids (via
`return_token_ids`), text and finish reason must be identical. Kills and drains happen once
every stream has received `K` tokens, with `max_tokens` large enough (and `ignore_eos`) that
none has finished.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest

from tandem.common.embedded_redis import EmbeddedRedis
from tandem.engine.tiny_model import TINY_VOCAB_SIZE
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, HEARTBEAT_TTL_S, Cluster, gateway_metric, start_gateway
from tests.integration.workers import STOP_TIMEOUT_S, start_worker, wait_until, worker_health

K = 4  # tokens every stream has received before a worker is killed or drained
STREAM_TIMEOUT_S = 240.0
NUM_STREAMS = 8


@dataclass
class Stream:
    """One streaming completion as the client saw it."""

    body: dict
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    boundaries: list[tuple[int, int]] = field(default_factory=list)  # (tokens, text chars) after each chunk
    done: bool = False  # saw `data: [DONE]`
    status: int = 0

    def outcome(self) -> tuple[list[int], str, str | None, list[str], bool, int]:
        return self.token_ids, "".join(self.text), self.finish_reason, self.errors, self.done, self.status


def _read(url: str, stream: Stream) -> None:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=STREAM_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/completions", json.dumps(stream.body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        stream.status = response.status
        while line := response.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: ") :].strip()
            if data == b"[DONE]":
                stream.done = True
                break
            event = json.loads(data)
            if "error" in event:
                stream.errors.append(event["error"]["message"])
                continue
            choice = event["choices"][0]
            stream.text.append(choice["text"])
            stream.token_ids.extend(choice.get("token_ids", ()))
            stream.boundaries.append((len(stream.token_ids), sum(len(t) for t in stream.text)))
            stream.finish_reason = choice["finish_reason"] or stream.finish_reason
    finally:
        conn.close()


def _start(gateway: ChildProcess, bodies: list[dict]) -> tuple[list[Stream], list[threading.Thread]]:
    streams = [Stream(body) for body in bodies]
    threads = [threading.Thread(target=_read, args=(gateway.address, s), daemon=True) for s in streams]
    for t in threads:
        t.start()
    return streams, threads


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(STREAM_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a stream never ended"


def _run(gateway: ChildProcess, bodies: list[dict]) -> list[Stream]:
    streams, threads = _start(gateway, bodies)
    _join(threads)
    return streams


def _bodies(vocab_size: int, max_tokens: int, seed: int, stop: str | None = None) -> list[dict]:
    """NUM_STREAMS requests: even ones greedy, odd ones seeded sampling (one stream each)."""
    prompts = random_prompts([20 + 3 * i for i in range(NUM_STREAMS)], vocab_size, seed=seed)
    bodies = []
    for i, prompt in enumerate(prompts):
        body = {
            "prompt": list(prompt),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
            "temperature": 0.0 if i % 2 == 0 else 0.8,
        }
        if i % 2:
            body["seed"] = 1000 + i
        bodies.append(body)
    return bodies


@dataclass
class Pool:
    """The module's cluster: decode workers come and go per test."""

    cluster: Cluster
    gateway: ChildProcess

    def add_decode(self, worker_id: str, *extra: str) -> ChildProcess:
        worker = start_worker(
            "decode",
            self.cluster.model_dir,
            "--redis",
            self.cluster.redis.url,
            "--heartbeat-ttl-s",
            str(HEARTBEAT_TTL_S),
            *extra,
            worker_id=worker_id,
        )
        self.cluster.decode.append(worker)
        assert wait_until(lambda: gateway_metric(self.gateway, "tandem_workers", pool="decode") == self.num_decode, 20)
        return worker

    @property
    def num_decode(self) -> int:
        return sum(1 for w in self.cluster.decode if w.is_running)

    def remove_dead(self) -> None:
        """Forget the stopped workers; wait until the gateway's registry has dropped them."""
        self.cluster.decode = [w for w in self.cluster.decode if w.is_running]
        assert wait_until(
            lambda: gateway_metric(self.gateway, "tandem_workers", pool="decode") == self.num_decode,
            4 * HEARTBEAT_TTL_S + 10,
        )

    def migrations(self, reason: str) -> float:
        return gateway_metric(self.gateway, "tandem_migrations_total", reason=reason)


@pytest.fixture(scope="module")
def pool(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    redis = EmbeddedRedis.start()
    cluster = Cluster(redis, [], [], tiny_model_dir, tmp_path_factory.mktemp("migration") / "spans.jsonl")
    gateway = None
    try:
        cluster.prefill.append(
            start_worker(
                "prefill",
                tiny_model_dir,
                "--redis",
                redis.url,
                "--heartbeat-ttl-s",
                str(HEARTBEAT_TTL_S),
                worker_id="prefill-m",
            )
        )
        # round robin: concurrent streams are spread evenly over the decode workers. Every
        # prompt (and every replay) is prefilled by the prefill worker and pulled.
        gateway = start_gateway(
            tiny_model_dir,
            redis.url,
            "--policy",
            "round_robin",
            "--local-prefill-max-tokens",
            "0",
            wait_ready=False,
        )
        yield Pool(cluster, gateway)
    finally:
        if gateway is not None:
            gateway.stop(GATEWAY_STOP_TIMEOUT_S)
        cluster.stop()


def _wait_all_have(streams: list[Stream], num_tokens: int) -> None:
    assert wait_until(lambda: all(len(s.token_ids) >= num_tokens for s in streams), STREAM_TIMEOUT_S)
    assert all(s.finish_reason is None for s in streams), "a stream finished before the failure"


def _stop_string(gateway: ChildProcess, body: dict, after_tokens: int) -> str:
    """A stop string whose first occurrence in `body`'s unbroken output starts at a chunk
    boundary past `after_tokens` tokens."""
    (probe,) = _run(gateway, [body])
    text = "".join(probe.text)
    for num_tokens, num_chars in probe.boundaries:
        candidate = text[num_chars : num_chars + 3]
        if num_tokens >= after_tokens and len(candidate) == 3 and text.find(candidate) == num_chars:
            return candidate
    raise AssertionError(f"no stop string found in the unbroken output {text!r}")


def test_kill_9_mid_stream_resumes_every_stream_exactly(pool: Pool) -> None:
    """Two decode workers; 8 streams (greedy and seeded) plus one with a stop string, all
    disaggregated; decode-0 is killed with SIGKILL once every stream has K tokens. Every stream
    completes with exactly the tokens, text and finish reason of an unbroken run."""
    d0 = pool.add_decode("decode-k0")
    pool.add_decode("decode-k1")
    # long enough that no stream can finish before the last one has K tokens: the decode stream
    # delivers a whole step's tokens at once, so a fast stream runs far ahead of a queued one
    bodies = _bodies(TINY_VOCAB_SIZE, max_tokens=160, seed=51)
    stop_body = {**bodies[0], "prompt": random_prompts([25], TINY_VOCAB_SIZE, seed=52)[0]}
    # late in the stream: the stop-string stream must still be running when decode-k0 dies
    # (its running count is read just before the kill), however far ahead decode-k0 is
    stop_body["stop"] = [_stop_string(pool.gateway, stop_body, after_tokens=64)]
    bodies.append(stop_body)
    unbroken = _run(pool.gateway, bodies)
    for s in unbroken:
        assert (s.errors, s.done, s.status) == ([], True, 200)
    assert unbroken[-1].finish_reason == "stop" and len(unbroken[-1].token_ids) > 64

    before = pool.migrations("worker_failed")
    streams, threads = _start(pool.gateway, bodies)
    _wait_all_have(streams, K)
    victims = worker_health(d0).running
    os.kill(d0.pid, signal.SIGKILL)
    _join(threads)
    assert [s.outcome() for s in streams[:-1]] == [s.outcome() for s in unbroken[:-1]]
    # with a stop string, the ids of the tokens past the stop that came in the same message
    # depend on how the worker batched its messages; the text may not
    stopped, reference = streams[-1], unbroken[-1]
    assert stopped.outcome()[1:] == reference.outcome()[1:]
    shorter = min(len(stopped.token_ids), len(reference.token_ids))
    assert stopped.token_ids[:shorter] == reference.token_ids[:shorter]
    assert victims >= 4  # round robin gave decode-k0 half of the 9 streams
    assert pool.migrations("worker_failed") - before == victims
    assert gateway_metric(pool.gateway, "tandem_migration_replayed_tokens_total") > 0
    d0.stop(STOP_TIMEOUT_S)
    pool.remove_dead()
    pool.cluster.assert_drained(timeout_s=10)


# ~120 tokens on the tiny model, whatever it samples: the streams are still running at the kill
LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "ids": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": 24,
            "maxItems": 24,
        },
        "note": {"type": "string", "minLength": 24, "maxLength": 24},
    },
    "required": ["ids", "note"],
    "additionalProperties": False,
}


def _constrained_bodies() -> list[dict]:
    """Four JSON-schema streams (greedy, seeded, and both with penalties) and two streams with
    presence/frequency penalties (greedy and seeded), in an order that gives each of two
    round-robin workers a greedy and a seeded JSON stream and a penalized one."""
    prompts = random_prompts([20 + 3 * i for i in range(6)], TINY_VOCAB_SIZE, seed=61)
    penalties = {"presence_penalty": -2.0, "frequency_penalty": 1.0}
    json_stream = {"max_tokens": 400, "guided_json": LONG_SCHEMA}
    plain_stream = {"max_tokens": 64, "ignore_eos": True, **penalties}
    kinds = [
        (json_stream, 0.0),
        (json_stream, 0.8),
        ({**json_stream, **penalties}, 0.8),
        ({**json_stream, **penalties}, 0.0),
        (plain_stream, 0.0),
        (plain_stream, 0.8),
    ]
    return [
        {"prompt": list(prompt), "stream": True, "return_token_ids": True, "temperature": t, "seed": 2000 + i, **kind}
        for i, (prompt, (kind, t)) in enumerate(zip(prompts, kinds))
    ]


def test_kill_9_mid_stream_resumes_constrained_and_penalized_streams_exactly(pool: Pool) -> None:
    """The replay carries the sent tokens as generated output (`Request.num_generated`): the
    resumed JSON streams continue the grammar where it was (the client's whole output
    validates) and the penalties count the sent tokens, so every stream equals its unbroken
    run (tokens, text, finish reason)."""
    d0 = pool.add_decode("decode-c0")
    pool.add_decode("decode-c1")
    bodies = _constrained_bodies()
    unbroken = _run(pool.gateway, bodies)
    for s in unbroken:
        assert (s.errors, s.done, s.status) == ([], True, 200)
    for s in unbroken[:4]:
        assert s.finish_reason == "stop" and len(s.token_ids) > 100
        jsonschema.validate(json.loads("".join(s.text)), LONG_SCHEMA)

    before = pool.migrations("worker_failed")
    num_decode = pool.num_decode  # 2, or 3 when a decode worker of an earlier test is still up
    assert num_decode in (2, 3)
    streams, threads = _start(pool.gateway, bodies)
    _wait_all_have(streams, K)
    victims = worker_health(d0).running
    os.kill(d0.pid, signal.SIGKILL)
    _join(threads)
    assert [s.outcome() for s in streams] == [s.outcome() for s in unbroken]
    for s in streams[:4]:
        jsonschema.validate(json.loads("".join(s.text)), LONG_SCHEMA)
    assert victims == len(bodies) // num_decode  # round robin spread the 6 streams evenly
    assert pool.migrations("worker_failed") - before == victims
    d0.stop(STOP_TIMEOUT_S)
    pool.remove_dead()
    pool.cluster.assert_drained(timeout_s=10)


def test_no_decode_worker_left_ends_the_stream_with_an_error_event(pool: Pool) -> None:
    """The last decode worker dies mid-stream: the migration finds no worker and the client
    gets one error event and `[DONE]` at once, with the tokens it had."""
    while pool.num_decode < 1:
        pool.add_decode(f"decode-b{len(pool.cluster.decode)}")
    for extra in pool.cluster.decode[1:]:
        extra.stop(STOP_TIMEOUT_S)
    pool.remove_dead()
    (last,) = pool.cluster.decode
    body = {**_bodies(TINY_VOCAB_SIZE, max_tokens=400, seed=53)[0]}
    streams, threads = _start(pool.gateway, [body])
    _wait_all_have(streams, K)
    os.kill(last.pid, signal.SIGKILL)
    killed_s = time.monotonic()
    _join(threads)
    (s,) = streams
    assert time.monotonic() - killed_s < 10
    assert (s.status, s.done, s.finish_reason, len(s.errors)) == (200, True, None, 1)
    assert s.errors[0].startswith(
        "generation failed: resuming on another decode worker failed: no worker can take the request"
    )
    assert K <= len(s.token_ids) < 400
    last.stop(STOP_TIMEOUT_S)
    pool.remove_dead()
    pool.cluster.assert_drained(timeout_s=10)


def test_scale_down_during_streaming_loses_nothing(pool: Pool) -> None:
    """A decode worker is drained (SIGTERM, drain deadline 0.5 s) while 8 streams run; the
    streams it cannot finish are ended as draining and resumed on the other worker: zero
    errors, every stream exactly as unbroken, and the drained worker exits 0."""
    leaving = pool.add_decode("decode-s0", "--drain-timeout-s", "0.5")
    pool.add_decode("decode-s1")
    # this gateway lets the decode workers prefill short prompts (and replays) themselves
    local = start_gateway(
        pool.cluster.model_dir,
        pool.cluster.redis.url,
        "--policy",
        "round_robin",
        "--local-prefill-max-tokens",
        "100000",  # however many tokens were sent before the drain deadline, the replay is local
    )
    try:
        bodies = _bodies(TINY_VOCAB_SIZE, max_tokens=400, seed=54)
        unbroken = _run(local, bodies)
        streams, threads = _start(local, bodies)
        _wait_all_have(streams, K)
        on_leaving = worker_health(leaving).running
        leaving.terminate()
        _join(threads)
        assert [s.outcome() for s in streams] == [s.outcome() for s in unbroken]
        assert all(s.outcome()[3:] == ([], True, 200) for s in streams)
        assert on_leaving == NUM_STREAMS // 2
        assert gateway_metric(local, "tandem_migrations_total", reason="draining") == on_leaving
        assert gateway_metric(local, "tandem_migrations_total", reason="worker_failed") == 0
        assert gateway_metric(local, "tandem_routing_decisions_total", kind="disaggregated") == 0
    finally:
        local.stop(GATEWAY_STOP_TIMEOUT_S)
    assert leaving.stop(STOP_TIMEOUT_S) == 0
    pool.remove_dead()
    pool.cluster.assert_drained(timeout_s=10)
