"""Poisoning regression (issue 16, deliverable 0), on a real cluster of its own (embedded
Redis, 1 prefill and 1 decode worker, a gateway): a decode worker uses a KV handle only if its
block hashes are the prompt's and its source a registered prefill worker at that address.

- A process leases prompt A's KV (Prefill) and calls Decode with prompt B and A's handle:
  the handle is rejected (hash_mismatch), the prompt is recomputed, nothing is pulled. A
  following request for B through the gateway then hits B's blocks in the decode worker's
  cache (64 cached tokens) and its text is exactly the engine's. Before the fix, those
  blocks held A's KV and the text was wrong.
- The same caller forges the handle instead: A's block ids and secret, B's block hashes, so the
  decode worker's own check passes. The source compares the hashes the pull carries with the
  ones it recorded for A's blocks and refuses (FAILED_PRECONDITION): nothing of A is pulled,
  the prompt is recomputed (kv_transfer_failures{reason="hash_mismatch"}), and a following
  request for B is again exact with B's blocks cached.
- A handle naming an address that is not its worker's registered one, or an unregistered
  worker, is rejected and that address never gets a connection.
- A genuine handle is used: only the prompt's full blocks are pulled.
Each test counts the decode worker's metrics exactly and ends with both pools drained.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.common.pb import tandem_pb2 as pb
from tandem.engine import Engine, SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tests.conftest import random_prompts
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster
from tests.e2e.test_gateway_errors import post
from tests.integration.workers import decode_stream, metric_sum, metrics_port, prefill, release_kv

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def small_cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster.start(tiny_model_dir, tmp_path_factory.mktemp("traces") / "spans.jsonl", num_prefill=1, num_decode=1)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=256)


def decode_counters(cluster: Cluster) -> dict[str, float]:
    """The decode worker's hand-off counters, by name (rejections by reason)."""
    url = f"http://127.0.0.1:{metrics_port(cluster.decode[0])}/metrics"
    counters = {
        name: metric_sum(url, f"tandem_{name}_total")
        for name in ("kv_transfer_blocks", "kv_transfer_failures", "kv_recomputes")
    }
    for reason in ("hash_mismatch", "unregistered_source", "incompatible_source", "registry_unavailable"):
        counters[reason] = metric_sum(url, "tandem_kv_handle_rejections_total", reason=reason)
    return counters


def changes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before if after[name] != before[name]}


def tokens(deltas: list[pb.DecodeDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def release_lease(cluster: Cluster, handle: pb.KVHandle) -> None:
    """The caller made the lease and holds its handle (and its secret): it ends it (nobody
    pulled it)."""
    assert release_kv(cluster.prefill[0], handle)


def legitimate_request_is_exact(cluster: Cluster, reference: Engine, model_dir: Path, prompt: list[int]) -> None:
    """A request for `prompt` through a fresh gateway (one decode worker, a short prompt: a local
    prefill there): exactly the engine's 16 tokens, with the prompt's 4 full blocks cached."""
    g = cluster.gateway()
    try:
        body = {"model": model_dir.name, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        status, _, got = post(g.address, "/v1/completions", json.dumps(body).encode())
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)
    assert status == 200, got
    expected = list(reference.generate([prompt], GREEDY)[0].token_ids)
    assert got["choices"][0]["text"] == Tokenizer.from_pretrained(model_dir).decode(expected)
    assert got["usage"]["completion_tokens"] == 16
    assert got["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}


def test_another_prompts_handle_never_fills_the_cache(
    small_cluster: Cluster, reference: Engine, tiny_model_dir
) -> None:
    cluster = small_cluster
    prompt_a, prompt_b = random_prompts([70, 70], reference.model_config.vocab_size, seed=161)
    before = decode_counters(cluster)
    leased = prefill(cluster.prefill[0], "attack", prompt_a, GREEDY)
    deltas = list(decode_stream(cluster.decode[0], "attack", prompt_b, GREEDY, leased))
    # recomputed from prompt B and the first token the caller sent: exactly the engine's
    rest = SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True)
    assert tokens(deltas) == list(reference.generate([prompt_b + [leased.first_token]], rest)[0].token_ids)
    assert (deltas[0].recomputed, deltas[0].num_pulled_blocks, deltas[0].num_cached_tokens) == (True, 0, 0)
    assert changes(before, decode_counters(cluster)) == {"hash_mismatch": 1, "kv_recomputes": 1}
    release_lease(cluster, leased.handle)

    # The legitimate request for B: with one decode worker and a short prompt, the gateway
    # routes it there (local prefill), where B's 4 full blocks are cached.
    legitimate_request_is_exact(cluster, reference, tiny_model_dir, prompt_b)
    assert changes(before, decode_counters(cluster)) == {"hash_mismatch": 1, "kv_recomputes": 1}
    cluster.assert_drained()


def test_a_handle_forged_with_the_prompts_hashes_is_refused_by_the_source(
    small_cluster: Cluster, reference: Engine, tiny_model_dir
) -> None:
    cluster = small_cluster
    prompt_a, prompt_b = random_prompts([70, 70], reference.model_config.vocab_size, seed=164)
    url = f"http://127.0.0.1:{metrics_port(cluster.decode[0])}/metrics"
    before = decode_counters(cluster)
    refused_before = metric_sum(url, "tandem_kv_transfer_failures_total", reason="hash_mismatch")
    # The caller learns B's block hashes from a lease of its own on B, then forges A's handle.
    probe = prefill(cluster.prefill[0], "forged-probe", prompt_b, GREEDY)
    release_lease(cluster, probe.handle)
    leased = prefill(cluster.prefill[0], "forged", prompt_a, GREEDY)
    genuine = pb.KVHandle()
    genuine.CopyFrom(leased.handle)
    assert len(probe.handle.block_hashes) == len(leased.handle.block_hashes) == 4
    assert list(probe.handle.block_hashes) != list(leased.handle.block_hashes)
    del leased.handle.block_hashes[:]
    leased.handle.block_hashes.extend(probe.handle.block_hashes)
    deltas = list(decode_stream(cluster.decode[0], "forged", prompt_b, GREEDY, leased))
    rest = SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True)
    assert tokens(deltas) == list(reference.generate([prompt_b + [leased.first_token]], rest)[0].token_ids)
    assert (deltas[0].recomputed, deltas[0].num_pulled_blocks, deltas[0].num_cached_tokens) == (True, 0, 0)
    # the handle passed the decode worker's check; the source refused the pull: nothing moved
    assert changes(before, decode_counters(cluster)) == {"kv_transfer_failures": 1, "kv_recomputes": 1}
    assert metric_sum(url, "tandem_kv_transfer_failures_total", reason="hash_mismatch") == refused_before + 1
    assert release_kv(cluster.prefill[0], genuine) is False  # the decode worker released it after the refusal

    legitimate_request_is_exact(cluster, reference, tiny_model_dir, prompt_b)
    assert changes(before, decode_counters(cluster)) == {"kv_transfer_failures": 1, "kv_recomputes": 1}
    cluster.assert_drained()


@pytest.fixture
def fake_source() -> Iterator[socket.socket]:
    """A listening socket that nobody should dial: a connection would wait in its backlog."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def dialed(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        return False
    conn.close()
    return True


@pytest.mark.parametrize("worker_id", ["prefill-0", "prefill-9"])
def test_a_source_that_is_not_registered_is_never_dialed(
    small_cluster: Cluster, reference: Engine, fake_source: socket.socket, worker_id: str
) -> None:
    cluster = small_cluster
    (prompt,) = random_prompts([40], reference.model_config.vocab_size, seed=162)
    before = decode_counters(cluster)
    rid = f"fake-source-{worker_id}"
    leased = prefill(cluster.prefill[0], rid, prompt, GREEDY)
    host, port = fake_source.getsockname()
    leased.handle.source_address = f"{host}:{port}"
    leased.handle.source_worker_id = worker_id  # registered elsewhere, or not at all
    genuine = pb.KVHandle()
    genuine.CopyFrom(leased.handle)
    deltas = list(decode_stream(cluster.decode[0], rid, prompt, GREEDY, leased))
    assert [leased.first_token] + tokens(deltas) == list(reference.generate([prompt], GREEDY)[0].token_ids)
    assert (deltas[0].recomputed, deltas[0].num_pulled_blocks) == (True, 0)
    assert changes(before, decode_counters(cluster)) == {"unregistered_source": 1, "kv_recomputes": 1}
    assert not dialed(fake_source)
    release_lease(cluster, genuine)
    cluster.assert_drained()


def test_a_genuine_handle_pulls_the_full_blocks(small_cluster: Cluster, reference: Engine) -> None:
    cluster = small_cluster
    (prompt,) = random_prompts([40], reference.model_config.vocab_size, seed=163)
    before = decode_counters(cluster)
    leased = prefill(cluster.prefill[0], "genuine", prompt, GREEDY)
    deltas = list(decode_stream(cluster.decode[0], "genuine", prompt, GREEDY, leased))
    assert [leased.first_token] + tokens(deltas) == list(reference.generate([prompt], GREEDY)[0].token_ids)
    # 2 full blocks pulled; the 8 tokens of the partial block are recomputed with the first token
    assert (deltas[0].recomputed, deltas[0].num_pulled_blocks) == (False, 2)
    assert changes(before, decode_counters(cluster)) == {"kv_transfer_blocks": 2}
    cluster.assert_drained()
