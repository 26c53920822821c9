"""vLLM's metric set on real worker processes: exact counter values and histogram counts and
sums after known requests, on a decode worker alone (colocated: it prefills locally) and on a
prefill + decode pair (disaggregated), where summing over the pools counts each request once
(services/tandem/worker/request_metrics.py has the rule)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.engine import SamplingParams
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.integration.workers import (
    STOP_TIMEOUT_S,
    decode_stream,
    disaggregated,
    metric_sum,
    metrics_port,
    start_worker,
    wait_until,
    worker_health,
)

MODEL = "tiny-served"
BLOCK_SIZE = 16
PROMPT_LEN, MAX_TOKENS = 40, 8
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
SERIES = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:request_queue_time_seconds_count",
    "vllm:request_prefill_time_seconds_count",
    "vllm:request_decode_time_seconds_count",
    "vllm:request_prompt_tokens_sum",
    "vllm:request_prompt_tokens_count",
    "vllm:request_generation_tokens_sum",
    "vllm:iteration_tokens_total_sum",
    "vllm:iteration_tokens_total_count",
)


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path) -> Iterator[tuple[ChildProcess, ChildProcess]]:
    common = ("--served-model-name", MODEL, "--kv-transport", "grpc", "--no-kv-shm")
    p = start_worker("prefill", tiny_model_dir, *common, worker_id="vm-p")
    try:
        d = start_worker("decode", tiny_model_dir, *common, worker_id="vm-d")
    except BaseException:
        p.stop(STOP_TIMEOUT_S)
        raise
    yield p, d
    assert d.stop(STOP_TIMEOUT_S) == 0
    assert p.stop(STOP_TIMEOUT_S) == 0


def _url(worker: ChildProcess) -> str:
    return f"http://127.0.0.1:{metrics_port(worker)}/metrics"


def _snapshot(worker: ChildProcess) -> dict[str, float]:
    """Every series of SERIES and the success counter by reason, for this worker's model."""
    url = _url(worker)
    values = {name: metric_sum(url, name, model_name=MODEL) for name in SERIES}
    for reason in ("stop", "length", "abort"):
        values[f"success:{reason}"] = metric_sum(url, "vllm:request_success_total", finished_reason=reason)
    return values


def _delta(worker: ChildProcess, before: dict[str, float]) -> dict[str, float]:
    after = _snapshot(worker)
    return {name: after[name] - before[name] for name in after}


def _idle(*workers: ChildProcess) -> bool:
    for w in workers:
        h = worker_health(w)
        if h.free_blocks != h.total_blocks or h.held_leases or h.waiting or h.running:
            return False
    return True


def _expected(**values: float) -> dict[str, float]:
    zeros = {name: 0.0 for name in SERIES} | {f"success:{r}": 0.0 for r in ("stop", "length", "abort")}
    return zeros | {k.replace("__", ":"): float(v) for k, v in values.items()}


def test_colocated_counts_are_exact_and_a_repeat_hits_the_prefix_cache(pair) -> None:
    _, d = pair
    (prompt,) = random_prompts([PROMPT_LEN], 256, seed=71)
    lengths = metric_sum(_url(d), "tandem_requests_finished_total", reason="length")
    before = _snapshot(d)
    deltas = list(decode_stream(d, "vm-local-1", prompt, PARAMS))
    assert sum(len(x.token_ids) for x in deltas) == MAX_TOKENS
    assert wait_until(lambda: _idle(d), 10.0)
    one_request = dict(
        vllm__prompt_tokens_total=PROMPT_LEN,
        vllm__generation_tokens_total=MAX_TOKENS,
        vllm__prefix_cache_queries_total=PROMPT_LEN,
        vllm__time_to_first_token_seconds_count=1,
        vllm__inter_token_latency_seconds_count=MAX_TOKENS - 1,
        vllm__e2e_request_latency_seconds_count=1,
        vllm__request_queue_time_seconds_count=1,
        vllm__request_prefill_time_seconds_count=1,
        vllm__request_decode_time_seconds_count=1,
        vllm__request_prompt_tokens_sum=PROMPT_LEN,
        vllm__request_prompt_tokens_count=1,
        vllm__request_generation_tokens_sum=MAX_TOKENS,
        vllm__iteration_tokens_total_count=MAX_TOKENS,  # the prompt in one step, then one per token
        success__length=1,
    )
    assert _delta(d, before) == _expected(vllm__iteration_tokens_total_sum=PROMPT_LEN + MAX_TOKENS - 1, **one_request)

    before = _snapshot(d)
    list(decode_stream(d, "vm-local-2", prompt, PARAMS))  # the same prompt: its full blocks are cached
    assert wait_until(lambda: _idle(d), 10.0)
    hits = (PROMPT_LEN - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert _delta(d, before) == _expected(
        vllm__prefix_cache_hits_total=hits,
        vllm__iteration_tokens_total_sum=PROMPT_LEN - hits + MAX_TOKENS - 1,
        **one_request,
    )
    assert metric_sum(_url(d), "tandem_requests_finished_total", reason="length") == lengths + 2


def test_disaggregated_counts_split_between_the_pools_without_double_counting(pair) -> None:
    p, d = pair
    (prompt,) = random_prompts([PROMPT_LEN], 256, seed=72)
    before_p, before_d = _snapshot(p), _snapshot(d)
    handoffs = metric_sum(_url(p), "tandem_requests_finished_total", reason="handoff")
    tokens, deltas = disaggregated(p, d, "vm-disagg-1", prompt, PARAMS)
    assert len(tokens) == MAX_TOKENS and deltas[0].num_pulled_blocks == PROMPT_LEN // BLOCK_SIZE
    assert wait_until(lambda: _idle(p, d), 10.0)
    assert _delta(p, before_p) == _expected(
        vllm__prompt_tokens_total=PROMPT_LEN,
        vllm__generation_tokens_total=1,
        vllm__prefix_cache_queries_total=PROMPT_LEN,
        vllm__time_to_first_token_seconds_count=1,
        vllm__request_queue_time_seconds_count=1,
        vllm__request_prefill_time_seconds_count=1,
        vllm__iteration_tokens_total_sum=PROMPT_LEN,
        vllm__iteration_tokens_total_count=1,
    )
    # D recomputes the partial last block with the first token (8 + 1 tokens), then decodes
    partial = PROMPT_LEN - PROMPT_LEN // BLOCK_SIZE * BLOCK_SIZE + 1
    assert _delta(d, before_d) == _expected(
        vllm__generation_tokens_total=MAX_TOKENS - 1,
        vllm__inter_token_latency_seconds_count=MAX_TOKENS - 1,
        vllm__e2e_request_latency_seconds_count=1,
        vllm__request_decode_time_seconds_count=1,
        vllm__request_prompt_tokens_sum=PROMPT_LEN,
        vllm__request_prompt_tokens_count=1,
        vllm__request_generation_tokens_sum=MAX_TOKENS,
        vllm__iteration_tokens_total_sum=partial + MAX_TOKENS - 2,
        vllm__iteration_tokens_total_count=MAX_TOKENS - 1,
        success__length=1,
    )
    assert metric_sum(_url(p), "tandem_requests_finished_total", reason="handoff") == handoffs + 1


def test_every_vllm_series_carries_the_served_model_name(pair) -> None:
    p, d = pair
    for worker, role in ((p, "prefill"), (d, "decode")):
        assert metric_sum(_url(worker), "vllm:cache_config_info", model_name=MODEL, role=role) == 1
        assert metric_sum(_url(worker), "vllm:num_requests_running", model_name=MODEL, engine="0") == 0
