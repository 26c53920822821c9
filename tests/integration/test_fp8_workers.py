"""FP8 KV cache across real prefill and decode worker processes.

1. Bit-exact hand-off: with `--kv-cache-dtype fp8` on both workers, the disaggregated tokens
   (P prefills, D pulls the fp8 blocks) equal the in-process colocated fp8 engine's and D's
   own colocated run of the same prompt, for every prompt length, over both KV transports.
2. Refusal: an fp8 prefill worker's handle is refused by a bfloat16 decode worker, and the
   error names both dtypes.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tandem.engine import Engine, SamplingParams
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
    worker_metric,
)

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LENGTHS = [1, 16, 17, 40, 100]


@pytest.fixture(scope="module", params=["grpc", "torch"])
def fp8_workers(request, tiny_model_dir: Path):
    transport = ("--kv-transport", request.param, "--no-kv-shm")  # the network transports, not same-host
    fp8 = ("--kv-cache-dtype", "fp8", *transport)
    p = start_worker("prefill", tiny_model_dir, *fp8, worker_id=f"p-fp8-{request.param}")
    d = start_worker("decode", tiny_model_dir, *fp8, worker_id=f"d-fp8-{request.param}")
    d_bf16 = start_worker(
        "decode", tiny_model_dir, "--dtype", "bfloat16", *transport, worker_id=f"d-bf16-{request.param}"
    )
    yield p, d, d_bf16
    for w in (d_bf16, d, p):
        assert w.stop(STOP_TIMEOUT_S) == 0


def test_fp8_disaggregated_equals_colocated(fp8_workers, tiny_model_dir: Path) -> None:
    p, d, _ = fp8_workers
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=256, kv_cache_dtype="fp8")
    prompts = random_prompts(LENGTHS, engine.model_config.vocab_size, seed=31)
    expected = [list(o.token_ids) for o in engine.generate(prompts, GREEDY)]
    for i, prompt in enumerate(prompts):
        tokens, deltas = disaggregated(p, d, f"fp8-pd-{i}", prompt, GREEDY)
        assert deltas[0].recomputed is False
        assert deltas[0].num_pulled_blocks == len(prompt) // 16
        # colocated on D: its prefix cache now holds the pulled fp8 blocks, the rest is local
        colocated = [t for delta in decode_stream(d, f"fp8-local-{i}", prompt, GREEDY) for t in delta.token_ids]
        assert tokens == colocated == expected[i], f"prompt {i} ({len(prompt)} tokens)"
    assert worker_metric(d, "tandem_kv_transfer_failures_total") == 0


def test_bf16_decode_refuses_an_fp8_handle_naming_both_dtypes(fp8_workers, tiny_model_dir: Path) -> None:
    p, _, d_bf16 = fp8_workers
    (prompt,) = random_prompts([40], 512, seed=32)
    first = prefill(p, "fp8-to-bf16", prompt, GREEDY)
    with pytest.raises(grpc.RpcError) as err:
        list(decode_stream(d_bf16, "fp8-to-bf16", prompt, GREEDY, first))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details()
    assert "kv_dtype (ours bfloat16, theirs float8_e4m3fn)" in details, details
    assert release_kv(p, first.handle) is True


def test_cache_config_info_and_ready_line_show_dtype_and_blocks(fp8_workers) -> None:
    """--kv-cache-mib 8 on the tiny model (2 layers, 2 KV heads x 16, block 16): a float32
    block is 8 KiB and an fp8 block 2 KiB, so fp8 holds 4096 blocks and bfloat16 2048."""
    p, _, d_bf16 = fp8_workers
    for worker, dtype, stored, blocks in ((p, "fp8", "float8_e4m3fn", 4096), (d_bf16, "auto", "bfloat16", 2048)):
        url = f"http://127.0.0.1:{metrics_port(worker)}/metrics"
        labels = {"cache_dtype": dtype, "num_gpu_blocks": str(blocks), "block_size": "16"}
        assert metric_sum(url, "vllm:cache_config_info", **labels) == 1.0
        assert worker.ready is not None
        assert (worker.ready["kv_cache_dtype"], worker.ready["kv_blocks"]) == (stored, blocks)
