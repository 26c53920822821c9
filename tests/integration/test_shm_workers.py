"""Real prefill and decode worker processes on one host: the hand-off goes through shared
memory when their host ids agree (`--kv-host-id`), over the network when they differ, and the
tokens are exact either way."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine import Engine, SamplingParams
from tandem.kvtransfer.shm_segments import SegmentName, pid_namespace
from tests.conftest import random_prompts
from tests.integration.workers import STOP_TIMEOUT_S, disaggregated, metric_sum, metrics_port, start_worker

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def pulls(worker, transport: str) -> float:
    return metric_sum(f"http://127.0.0.1:{metrics_port(worker)}/metrics", "tandem_kv_pulls_total", transport=transport)


@pytest.fixture(scope="module")
def workers(tiny_model_dir: Path, tmp_path_factory):
    shm_dir = tmp_path_factory.mktemp("shm")
    common = ("--kv-shm-dir", str(shm_dir))
    p = start_worker("prefill", tiny_model_dir, *common, "--kv-host-id", "host-a", worker_id="p-shm")
    same = start_worker("decode", tiny_model_dir, *common, "--kv-host-id", "host-a", worker_id="d-shm-same")
    other = start_worker("decode", tiny_model_dir, *common, "--kv-host-id", "host-b", worker_id="d-shm-other")
    yield p, same, other, shm_dir
    for w in (other, same, p):
        assert w.stop(STOP_TIMEOUT_S) == 0
    assert list(shm_dir.iterdir()) == []


def test_same_host_pair_is_exact_through_shm_and_other_host_uses_the_network(workers, tiny_model_dir: Path) -> None:
    p, same, other, shm_dir = workers
    reference = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    prompts = random_prompts([40, 100], reference.model_config.vocab_size, seed=31)
    expected = [list(o.token_ids) for o in reference.generate(prompts, GREEDY)]
    for i, prompt in enumerate(prompts):
        tokens, deltas = disaggregated(p, same, f"shm-{i}", prompt, GREEDY)
        assert tokens == expected[i] and deltas[0].recomputed is False
        tokens, deltas = disaggregated(p, other, f"net-{i}", prompt, GREEDY)
        assert tokens == expected[i] and deltas[0].recomputed is False
    assert (pulls(same, "shm"), pulls(same, "grpc")) == (2, 0)
    assert (pulls(other, "shm"), pulls(other, "grpc")) == (0, 2)
    # the CPU prefill worker's KV cache is a shared pool file that the receiver copied out of:
    # no segment was made; stopping the workers removes the pool (the fixture checks)
    [pool] = shm_dir.iterdir()
    assert SegmentName.parse(pool.name) == SegmentName(pid_namespace(), p.pid, pool=True)
