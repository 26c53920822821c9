"""Request ownership at real workers (issue 16, deliverable 2): only the submitter of a request
can Abort it, and only a holder of a KV handle can pull or release its lease.

A stranger (a process with the request id, even the whole handle, but not the secrets) gets
NOT_FOUND or `released = false`, exactly as for an unknown id, and nothing changes: the stream
goes on to its exact tokens, and the lease stays pullable by its holder. The legitimate paths
still work: the decode worker pulls and releases, the owner aborts, and the gateway's pipeline
releases the lease of a handle it will not use when its client goes away. Every case ends with
the pools drained and every lease released.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace

from tandem.common import kv_codec
from tandem.common.cluster_state import ClusterState
from tandem.common.ownership import new_owner_secret
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import Request
from tandem.engine import Engine, SamplingParams
from tandem.gateway.clients import WorkerClients
from tandem.gateway.config import GatewayConfig
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.pipeline import Pipeline
from tandem.launcher.processes import ChildProcess
from tandem.scheduler import Scheduler, SchedulerConfig
from tests.conftest import random_prompts
from tests.integration.workers import (
    STOP_TIMEOUT_S,
    abort,
    cluster_token,
    decode_stream,
    metric_sum,
    metrics_port,
    prefill,
    release_kv,
    start_worker,
    wait_until,
    worker_channel,
    worker_health,
    worker_metric,
)

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)  # seconds of decoding
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, block_size, kv heads, head_dim, fp32
NO_LEASE = "no lease for request {!r} (unknown request id, or not its secret)"
NOT_OWNED = "no live request {!r} submitted with this call's x-tandem-owner on this worker"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=256)


@pytest.fixture(scope="module", params=["grpc", "torch"])
def pair(request, tiny_model_dir: Path, redis_server):
    """A prefill and a decode worker; the decoder runs one sequence at a time, so a request
    queued behind a long one stays live for as long as that one runs."""
    transport = request.param
    common = ("--redis", redis_server.url, "--kv-transport", transport)
    p = start_worker("prefill", tiny_model_dir, *common, worker_id=f"p-own-{transport}")
    d = start_worker("decode", tiny_model_dir, *common, "--max-num-seqs", "1", worker_id=f"d-own-{transport}")
    yield transport, p, d
    assert d.stop(STOP_TIMEOUT_S) == 0
    assert p.stop(STOP_TIMEOUT_S) == 0


def _drained(*workers: ChildProcess) -> bool:
    for w in workers:
        h = worker_health(w)
        if h.free_blocks != h.total_blocks or h.held_leases or h.waiting or h.running:
            return False
    return True


def _load(worker: ChildProcess) -> tuple[int, int]:
    h = worker_health(worker)
    return h.waiting, h.running


def _tokens(deltas: list[pb.DecodeDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def _refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _abort_refusal(worker: ChildProcess, request_id: str, owner: str | None) -> tuple[grpc.StatusCode, str]:
    return _refusal(lambda: abort(worker, request_id, owner))


def _stolen_pull(worker: ChildProcess, handle: pb.KVHandle, secret: bytes) -> list[bytes]:
    """PullKV of every block of `handle` (its request id, block ids and layout) with `secret`;
    the chunks received before the stream ended."""
    call = worker_channel(worker).unary_stream(
        f"/{kv_codec.KV_TRANSFER_SERVICE}/PullKV",
        request_serializer=kv_codec.pull_kv_request_to_bytes,
        response_deserializer=None,
    )
    hashes = (0,) * len(handle.block_ids)  # one per id; a wrong secret is refused before they are compared
    request = kv_codec.PullKVRequest(handle.request_id, tuple(handle.block_ids), handle.layout, 0, secret, hashes)
    chunks: list[bytes] = []
    with pytest.raises(grpc.RpcError) as err:
        for chunk in call(request, timeout=10):
            chunks.append(chunk)
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.NOT_FOUND, NO_LEASE.format(handle.request_id))
    return chunks


def _stolen_send(worker: ChildProcess, handle: pb.KVHandle, secret: bytes) -> tuple[grpc.StatusCode, str]:
    """SendKV (the torch transport's pull) of `handle`'s blocks to a store on this host."""
    call = worker_channel(worker).unary_unary(
        f"/{kv_codec.KV_TRANSFER_SERVICE}/SendKV",
        request_serializer=kv_codec.send_kv_request_to_bytes,
        response_deserializer=kv_codec.send_kv_result_from_bytes,
    )
    request = kv_codec.SendKVRequest(
        handle.request_id,
        tuple(handle.block_ids),
        handle.layout,
        "127.0.0.1:9",
        "stolen",
        0,
        secret,
        (0,) * len(handle.block_ids),
    )
    return _refusal(lambda: call(request, timeout=10))


def test_pull_and_release_without_the_lease_secret_fail_and_its_holder_still_pulls(pair, reference: Engine) -> None:
    transport, p, d = pair
    owner = new_owner_secret()
    (prompt,) = random_prompts([70], reference.model_config.vocab_size, seed=61)
    rid = f"lease-{transport}"
    first = prefill(p, rid, prompt, GREEDY, owner=owner)
    handle = first.handle
    assert len(handle.lease_secret) == 32 and len(handle.block_ids) == 5
    for wrong in (b"", bytes(32), handle.lease_secret[:16], bytes(b ^ 1 for b in handle.lease_secret)):
        assert _stolen_pull(p, handle, wrong) == []  # not one byte of its KV cache
        if transport == "torch":
            assert _stolen_send(p, handle, wrong) == (grpc.StatusCode.NOT_FOUND, NO_LEASE.format(rid))
        assert release_kv(p, handle, secret=wrong) is False
    for stranger in (None, new_owner_secret()):  # the Prefill call ended: nobody can Abort it
        assert _abort_refusal(p, rid, stranger) == (grpc.StatusCode.NOT_FOUND, NOT_OWNED.format(rid))
    assert worker_health(p).held_leases == 1  # nothing was released
    # its holder, the decode worker, pulls every full block (70 tokens: 4 of the 5; the tail is
    # recomputed, see decode/handle_check.py) and releases the lease
    bytes_before = worker_metric(d, "tandem_kv_transfer_bytes_total")
    deltas = list(decode_stream(d, rid, prompt, GREEDY, first, owner=owner))
    assert [first.first_token] + _tokens(deltas) == list(reference.generate([prompt], GREEDY)[0].token_ids)
    assert (deltas[0].recomputed, deltas[0].num_pulled_blocks) == (False, 4)
    assert worker_metric(d, "tandem_kv_transfer_bytes_total") - bytes_before == 4 * BLOCK_BYTES
    assert worker_metric(d, "tandem_kv_transfer_failures_total") == 0
    assert wait_until(lambda: _drained(p, d), 5.0)
    assert release_kv(p, handle) is False  # the decode worker already released it


def test_abort_from_a_process_that_does_not_own_the_request_fails_and_the_stream_goes_on(
    pair, reference: Engine
) -> None:
    transport, p, d = pair
    gateway, other_gateway = new_owner_secret(), new_owner_secret()
    blocker_prompt, prompt = random_prompts([10, 40], reference.model_config.vocab_size, seed=62)
    rid = f"victim-{transport}"
    blocker = decode_stream(d, f"blocker-{transport}", blocker_prompt, LONG, owner=gateway)
    next(blocker)  # running: the decoder's one slot is taken for seconds
    first = prefill(p, rid, prompt, GREEDY, owner=gateway)
    victim = decode_stream(d, rid, prompt, GREEDY, first, owner=gateway)
    assert wait_until(lambda: _load(d) == (1, 1), 10.0)  # pulled, and waiting behind the blocker
    # a stranger knows the id: no owner secret, another gateway's, a malformed one
    for worker in (d, p):
        for stranger in (None, other_gateway, "not-a-secret"):
            assert _abort_refusal(worker, rid, stranger) == (grpc.StatusCode.NOT_FOUND, NOT_OWNED.format(rid))
    # an unknown id gets the same answer, even from the gateway: nothing tells them apart
    ghost = f"ghost-{transport}"
    assert _abort_refusal(d, ghost, gateway) == (grpc.StatusCode.NOT_FOUND, NOT_OWNED.format(ghost))
    assert _load(d) == (1, 1)  # nothing changed: the victim still waits, the blocker runs
    # its owner can abort: the blocker ends at once, and the victim runs to its exact end
    assert abort(d, f"blocker-{transport}", gateway) is True
    assert list(blocker)[-1].finish_reason == pb.FINISH_REASON_ABORT
    deltas = list(victim)
    assert [first.first_token] + _tokens(deltas) == list(reference.generate([prompt], GREEDY)[0].token_ids)
    assert (deltas[0].recomputed, deltas[-1].finish_reason) == (False, pb.FINISH_REASON_LENGTH)
    assert wait_until(lambda: _drained(p, d), 5.0)


def test_gateway_releases_the_lease_of_a_handle_its_client_left_behind(
    pair, reference: Engine, tiny_model_dir: Path, redis_server
) -> None:
    """The client goes away right after the first token, before any decode worker got the
    handle: the pipeline's ReleaseKV (with the handle's secret) frees the lease at once, long
    before it would expire (30 s)."""
    transport, p, d = pair
    config = GatewayConfig(
        model_dir=tiny_model_dir,
        redis_url=redis_server.url,
        scheduler=SchedulerConfig(local_prefill_max_tokens=0),  # always disaggregate
    )
    (prompt,) = random_prompts([50], reference.model_config.vocab_size, seed=63)
    expected = list(reference.generate([prompt], GREEDY)[0].token_ids)
    redis_client = redis_server.client(socket_timeout=2.0, socket_connect_timeout=2.0)
    scheduler = Scheduler(ClusterState(redis_client, config.cluster), config.scheduler, model_id=config.hash_model_id)
    scheduler.refresh_now()

    async def main() -> None:
        clients = WorkerClients(cluster_token())
        pipeline = Pipeline(config, scheduler, clients, GatewayMetrics("tiny"), trace.get_tracer("test"))
        try:
            left = pipeline.generate(Request(f"left-{transport}", tuple(prompt), GREEDY))
            assert (await anext(left)).token_ids == (expected[0],)
            assert worker_health(p).held_leases == 1  # the handle's lease
            await left.aclose()  # the client went away
            assert await asyncio.to_thread(wait_until, lambda: _drained(p, d), 5.0)
            # the legitimate path: the decode worker pulls and releases
            tokens = [
                t
                async for delta in pipeline.generate(Request(f"stay-{transport}", tuple(prompt), GREEDY))
                for t in delta.token_ids
            ]
            assert tokens == expected
        finally:
            await clients.close()

    try:
        asyncio.run(main())
    finally:
        redis_client.close()
    assert wait_until(lambda: _drained(p, d), 5.0)


def test_a_holder_claiming_another_prompts_hashes_gets_nothing_and_the_prompt_is_recomputed(
    pair, reference: Engine
) -> None:
    """Cache poisoning by a holder of a handle (issue 16, deliverable 0): lease A's handle and
    secret, prompt B's block hashes (from a lease of B's). The decode worker's own check passes;
    the source compares the hashes the pull carries with A's and sends nothing. The prompt is
    recomputed exactly, and B's own hand-off then finds B's blocks in the decode worker's cache."""
    transport, p, d = pair
    owner = new_owner_secret()
    prompt_a, prompt_b = random_prompts([70, 70], reference.model_config.vocab_size, seed=63)
    probe = prefill(p, f"probe-{transport}", prompt_b, GREEDY, owner=owner)
    assert release_kv(p, probe.handle) is True
    rid = f"forged-{transport}"
    first = prefill(p, rid, prompt_a, GREEDY, owner=owner)
    genuine = pb.KVHandle()
    genuine.CopyFrom(first.handle)
    del first.handle.block_hashes[:]
    first.handle.block_hashes.extend(probe.handle.block_hashes)
    counters = ("tandem_kv_transfer_bytes_total", "tandem_kv_recomputes_total")
    before = [worker_metric(d, name) for name in counters]
    url = f"http://127.0.0.1:{metrics_port(d)}/metrics"
    refused = metric_sum(url, "tandem_kv_transfer_failures_total", reason="hash_mismatch")
    deltas = list(decode_stream(d, rid, prompt_b, GREEDY, first, owner=owner))
    rest = SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True)
    assert _tokens(deltas) == list(reference.generate([prompt_b + [first.first_token]], rest)[0].token_ids)
    assert (deltas[0].recomputed, deltas[0].num_pulled_blocks, deltas[0].num_cached_tokens) == (True, 0, 0)
    assert [worker_metric(d, name) - b for name, b in zip(counters, before)] == [0, 1]  # not a byte of A
    assert metric_sum(url, "tandem_kv_transfer_failures_total", reason="hash_mismatch") == refused + 1
    assert release_kv(p, genuine) is False  # the decode worker released it after the refusal
    # B's legitimate hand-off: its 4 full blocks are already cached (B's, recomputed), so
    # nothing is pulled, and the tokens are exact
    legit = prefill(p, f"legit-{transport}", prompt_b, GREEDY, owner=owner)
    deltas = list(decode_stream(d, f"legit-{transport}", prompt_b, GREEDY, legit, owner=owner))
    assert [legit.first_token] + _tokens(deltas) == list(reference.generate([prompt_b], GREEDY)[0].token_ids)
    assert (deltas[0].recomputed, deltas[0].num_pulled_blocks, deltas[0].num_cached_tokens) == (False, 0, 64)
    assert [worker_metric(d, name) - b for name, b in zip(counters, before)] == [0, 1]
    assert wait_until(lambda: _drained(p, d), 5.0)
