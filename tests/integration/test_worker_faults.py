"""Faults that need their own workers: a killed prefill worker, an expired lease, a corrupted
chunk, and the registry (SIGKILL expiry, SIGTERM drain and deregistration)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tandem.common.block_hash import BLOCK_HASH_VERSION
from tandem.common.cluster_state import ClusterState
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.workers import WorkerRole
from tandem.engine import Engine, SamplingParams
from tests.conftest import random_prompts
from tests.integration.workers import (
    STOP_TIMEOUT_S,
    cluster_token,
    decode_stream,
    metrics_port,
    prefill,
    start_worker,
    wait_until,
    worker_health,
    worker_metric,
)

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=128)


def test_killed_prefill_worker_makes_decode_recompute(tiny_model_dir: Path, reference: Engine) -> None:
    p = start_worker("prefill", tiny_model_dir, worker_id="p-killed")
    d = start_worker("decode", tiny_model_dir, "--transfer-timeout-s", "3", worker_id="d-killed")
    try:
        (prompt,) = random_prompts([50], reference.model_config.vocab_size, seed=31)
        first = prefill(p, "killed", prompt, GREEDY)
        p.kill()
        deltas = list(decode_stream(d, "killed", prompt, GREEDY, first))
        assert deltas[0].recomputed is True
        assert [first.first_token] + [t for x in deltas for t in x.token_ids] == list(
            reference.generate([prompt], GREEDY)[0].token_ids
        )
        assert worker_metric(d, "tandem_kv_transfer_failures_total") == 1
        assert wait_until(lambda: worker_health(d).free_blocks == worker_health(d).total_blocks, 2.0)
    finally:
        d.stop(STOP_TIMEOUT_S)
        p.kill()


def test_unpulled_lease_expires_and_frees_blocks(tiny_model_dir: Path, reference: Engine) -> None:
    p = start_worker("prefill", tiny_model_dir, "--lease-ttl-s", "1", worker_id="p-lease")
    try:
        (prompt,) = random_prompts([40], reference.model_config.vocab_size, seed=32)
        first = prefill(p, "lease", prompt, GREEDY)
        assert first.handle.block_ids and len(first.handle.block_ids) == 3
        health = worker_health(p)
        assert health.held_leases == 1 and health.total_blocks - health.free_blocks == 3
        assert wait_until(lambda: worker_health(p).held_leases == 0, 3.0)
        assert wait_until(lambda: worker_health(p).free_blocks == worker_health(p).total_blocks, 1.0)
        assert worker_metric(p, "tandem_lease_expiries_total") == 1
    finally:
        assert p.stop(STOP_TIMEOUT_S) == 0


def test_registry_sigkill_expires_and_drain_deregisters(tiny_model_dir: Path, redis_server) -> None:
    state = ClusterState(redis.Redis.from_url(redis_server.url), "default")
    args = ("--redis", redis_server.url, "--heartbeat-ttl-s", "1.5")
    p = start_worker("prefill", tiny_model_dir, *args, worker_id="p-reg")
    d = start_worker("decode", tiny_model_dir, *args, worker_id="d-reg")
    try:
        workers = {w.worker_id: w for w in state.list_workers()}
        assert set(workers) >= {"p-reg", "d-reg"}
        assert workers["p-reg"].role is WorkerRole.PREFILL and workers["p-reg"].address == p.address
        assert workers["d-reg"].fingerprint == worker_health(d).layout_fingerprint
        # the tiny model's id is its directory's name; block size and hash version as configured
        scheme = {(w.block_size, w.model_id, w.block_hash_version) for w in workers.values()}
        assert scheme == {(16, tiny_model_dir.name, BLOCK_HASH_VERSION)}
        d.kill()
        assert wait_until(lambda: state.get_worker("d-reg") is None, 1.5 + 0.5)
        assert p.stop(STOP_TIMEOUT_S) == 0
        assert state.get_worker("p-reg") is None  # deregistered before exit, not by TTL
    finally:
        p.kill()
        d.kill()


class _CorruptingProxy:
    """A KVTransfer source that forwards to the real prefill worker but flips one byte of the
    first chunk's payload, leaving its checksum as the source computed it."""

    def __init__(self, upstream: str) -> None:
        import grpc

        from tandem.common.plane_auth import sync_channel

        self._channel = sync_channel(upstream, cluster_token())
        self.server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(4))
        pull = self._channel.unary_stream(
            "/tandem.v1.KVTransfer/PullKV", request_serializer=None, response_deserializer=None
        )
        release = self._channel.unary_unary(
            "/tandem.v1.KVTransfer/ReleaseKV", request_serializer=None, response_deserializer=None
        )

        def pull_kv(raw: bytes, context):
            for i, chunk_raw in enumerate(pull(raw, timeout=10)):
                if i == 0:
                    chunk = pb.KVChunk.FromString(chunk_raw)
                    data = bytearray(chunk.data)
                    data[len(data) // 2] ^= 0xFF
                    chunk.data = bytes(data)
                    chunk_raw = chunk.SerializeToString()
                yield chunk_raw

        handlers = {
            "PullKV": grpc.unary_stream_rpc_method_handler(pull_kv),
            "ReleaseKV": grpc.unary_unary_rpc_method_handler(lambda raw, ctx: release(raw, timeout=5)),
        }
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("tandem.v1.KVTransfer", handlers)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)
        self._channel.close()


def test_corrupted_chunk_is_detected_and_recomputed(tiny_model_dir: Path, reference: Engine) -> None:
    p = start_worker("prefill", tiny_model_dir, worker_id="p-corrupt")
    d = start_worker("decode", tiny_model_dir, worker_id="d-corrupt")
    proxy = _CorruptingProxy(p.address)
    try:
        (prompt,) = random_prompts([100], reference.model_config.vocab_size, seed=33)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        first = prefill(p, "corrupt", prompt, params)
        first.handle.source_address = f"127.0.0.1:{proxy.port}"
        deltas = list(decode_stream(d, "corrupt", prompt, params, first))
        assert deltas[0].recomputed is True and deltas[0].num_pulled_blocks == 0
        assert [first.first_token] + [t for x in deltas for t in x.token_ids] == list(
            reference.generate([prompt], params)[0].token_ids
        )
        assert worker_metric(d, "tandem_kv_transfer_failures_total") == 1
        text_has_reason = 'reason="checksum"'
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(d)}/metrics", timeout=5).read().decode()
        assert any(
            line.startswith("tandem_kv_transfer_failures_total") and text_has_reason in line
            for line in metrics.splitlines()
        )
        assert wait_until(
            lambda: worker_health(p).held_leases == 0 and worker_health(d).free_blocks == worker_health(d).total_blocks,
            2.0,
        )
    finally:
        proxy.close()
        p.stop(STOP_TIMEOUT_S)
        d.stop(STOP_TIMEOUT_S)


def test_sigterm_drains_running_work_then_exits(tiny_model_dir: Path, reference: Engine, redis_server) -> None:
    import grpc

    state = ClusterState(redis.Redis.from_url(redis_server.url), "default")
    d = start_worker("decode", tiny_model_dir, "--redis", redis_server.url, worker_id="d-drain")
    try:
        (prompt,) = random_prompts([30], reference.model_config.vocab_size, seed=34)
        params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
        stream = decode_stream(d, "drain", prompt, params)
        tokens = list(next(stream).token_ids)
        d.terminate()
        assert wait_until(lambda: worker_health(d).draining, 2.0)
        with pytest.raises(grpc.RpcError) as err:
            list(decode_stream(d, "late", prompt, GREEDY))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
        tokens += [t for delta in stream for t in delta.token_ids]
        assert tokens == list(reference.generate([prompt], params)[0].token_ids)
        assert d.stop(10) == 0
        assert state.get_worker("d-drain") is None
    finally:
        d.kill()
