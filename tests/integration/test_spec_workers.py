"""Speculative decoding through real prefill and decode worker processes (issue 17).

Both roles run with `--speculative-config`: an n-gram decode worker and a draft-model decode
worker (the draft is the target's first layer alone, tests/unit/test_spec_exactness.py), with
their KV pulled from a prefill worker over gRPC. The reference is the in-process engine without
speculation, with the same weights and dtype:

1. Greedy, disaggregated: the same tokens, finish reasons and logprobs (top 3, 1e-5) as the
   reference, with stop tokens and `max_tokens` placed inside runs the decode worker accepted,
   for several requests sent at once; drafts were accepted (so verification ran).
2. The decode worker's `vllm:spec_decode_num_accepted_tokens_total` is > 0 and `tandem status
   --json` reports its nonzero acceptance from its Redis load record.
3. Seeded sampling: a seed gives the same tokens twice, and the same disaggregated (first
   token sampled on the prefill worker) as colocated (the decode worker prefills).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tandem.common.embedded_redis import EmbeddedRedis
from tandem.common.pb import tandem_pb2 as pb
from tandem.engine import Engine, FinishReason, SamplingParams
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.integration.workers import (
    REPO_ROOT,
    STOP_TIMEOUT_S,
    decode_stream,
    disaggregated,
    start_worker,
    wait_until,
    worker_metric,
)
from tests.unit.test_spec_exactness import first_layer_draft

METHODS = ("ngram", "draft_model")
MAX_TOKENS = 32
FINISH = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
}


def spec_config(method: str, tiny_model_dir: Path) -> str:
    if method == "ngram":
        return json.dumps(
            {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
        )
    draft = first_layer_draft(tiny_model_dir, tiny_model_dir.parent / "tiny-llama-first-layer")
    return json.dumps({"method": "draft_model", "model": str(draft), "num_speculative_tokens": 4})


@pytest.fixture(scope="module")
def workers(tiny_model_dir: Path, redis_server: EmbeddedRedis) -> Iterator[dict[str, ChildProcess]]:
    """ "prefill" (speculating n-gram, which a prefill worker never uses) and one decode worker per method."""
    common = ("--redis", redis_server.url, "--kv-transport", "grpc", "--heartbeat-ttl-s", "2")
    started: dict[str, ChildProcess] = {}
    try:
        started["prefill"] = start_worker(
            "prefill",
            tiny_model_dir,
            *common,
            "--speculative-config",
            spec_config("ngram", tiny_model_dir),
            worker_id="p-spec",
        )
        for method in METHODS:
            started[method] = start_worker(
                "decode",
                tiny_model_dir,
                *common,
                "--speculative-config",
                spec_config(method, tiny_model_dir),
                worker_id=f"d-spec-{method.replace('_', '-')}",
            )
        yield started
    finally:
        for worker in reversed(list(started.values())):
            assert worker.stop(STOP_TIMEOUT_S) == 0


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=256)


def repeated_prompts(vocab: int, seed: int) -> list[list[int]]:
    """A random span written three times, then a different tail: n-gram matches from the start."""
    spans = random_prompts([5, 9, 3, 14], vocab, seed=seed)
    tails = random_prompts([2, 4, 1, 6], vocab, seed=seed + 1)
    return [span * 3 + tail for span, tail in zip(spans, tails)]


def run_concurrently(
    p: ChildProcess, d: ChildProcess, tag: str, prompts: list[list[int]], params: list[SamplingParams]
) -> list[tuple[list[int], list[pb.DecodeDelta]]]:
    """Every request at once, each prefilled on `p` and decoded on `d`: (tokens, deltas) each."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [
            pool.submit(disaggregated, p, d, f"{tag}-{i}", prompt, sampling)
            for i, (prompt, sampling) in enumerate(zip(prompts, params))
        ]
        return [f.result() for f in futures]


def assert_logprobs_equal(expected: list, got: list[pb.TokenLogprob]) -> None:
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.token_id == e.token_id
        assert list(g.top_token_ids) == [t for t, _ in e.top]
        torch.testing.assert_close(
            torch.tensor([g.logprob, *g.top_logprobs], dtype=torch.float64),
            torch.tensor([e.logprob, *(v for _, v in e.top)], dtype=torch.float64),
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("method", METHODS)
def test_greedy_disaggregated_equals_the_engine_without_speculation(
    method: str, workers: dict[str, ChildProcess], reference: Engine
) -> None:
    p, d = workers["prefill"], workers[method]
    vocab = reference.model_config.vocab_size
    prompts = repeated_prompts(vocab, seed=21)
    plain = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    runs = reference.generate(prompts, plain)
    accepted_before = worker_metric(d, "vllm:spec_decode_num_accepted_tokens_total")
    # logprobs, then stops and max_tokens at positions inside and across accepted runs
    cases: list[list[SamplingParams]] = [
        [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)] * len(prompts)
    ]
    for i in (2, 3, 6, 11):
        cases.append([SamplingParams(max_tokens=i, temperature=0.0, ignore_eos=True)] * len(prompts))
        cases.append(
            [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=(r.token_ids[i],)) for r in runs]
        )
    for c, params in enumerate(cases):
        expected = reference.generate(prompts, params)
        got = run_concurrently(p, d, f"greedy-{method}-{c}", prompts, params)
        for e, (tokens, deltas) in zip(expected, got):
            assert tokens == list(e.token_ids), f"case {c}"
            assert FINISH[deltas[-1].finish_reason] is e.finish_reason, f"case {c}"
            if params[0].logprobs is not None:
                assert e.logprobs is not None
                # the first token's logprob comes from the prefill worker; the decode worker's rest
                assert_logprobs_equal(list(e.logprobs[1:]), [lp for delta in deltas for lp in delta.logprobs])
    assert worker_metric(d, "vllm:spec_decode_num_accepted_tokens_total") > accepted_before
    assert worker_metric(workers["prefill"], "vllm:spec_decode_num_drafts_total") == 0


def test_decode_workers_report_acceptance_in_metrics_and_tandem_status(
    workers: dict[str, ChildProcess], redis_server: EmbeddedRedis, reference: Engine
) -> None:
    # the greedy test's prompts: on them the first-layer draft agrees with the target at times
    prompts = repeated_prompts(reference.model_config.vocab_size, seed=21)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)] * len(prompts)
    for method in METHODS:
        run_concurrently(workers["prefill"], workers[method], f"status-{method}", prompts, params)
        d = workers[method]
        # the worker mirrors its engine's counters into /metrics on its loop's next tick
        assert wait_until(
            lambda d=d: worker_metric(d, "vllm:spec_decode_num_accepted_tokens_total") > 0,
            10.0,
        ), method
        drafted = worker_metric(d, "vllm:spec_decode_num_draft_tokens_total")
        accepted = worker_metric(d, "vllm:spec_decode_num_accepted_tokens_total")
        assert 0 < accepted <= drafted
        assert worker_metric(d, "vllm:spec_decode_num_accepted_tokens_per_pos_total") == accepted

    def acceptance() -> dict[str, float | None]:
        done = subprocess.run(
            [sys.executable, "-m", "tandem", "status", "--redis-url", redis_server.url, "--json"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return {w["worker_id"]: w["spec_acceptance_perc"] for w in json.loads(done.stdout)["workers"]}

    shown: dict[str, float | None] = {}

    def all_shown() -> bool:
        shown.update(acceptance())
        return all((shown.get(workers[m].name) or 0.0) > 0.0 for m in METHODS)

    assert wait_until(all_shown, timeout_s=20.0, interval_s=0.5), shown
    assert shown["p-spec"] is None  # a prefill worker drafts nothing
    for method in METHODS:

        def status_matches_metrics(d: ChildProcess = workers[method]) -> bool:
            """The heartbeat publishes the load a little after /metrics: wait until they agree."""
            drafted = worker_metric(d, "vllm:spec_decode_num_draft_tokens_total")
            accepted = worker_metric(d, "vllm:spec_decode_num_accepted_tokens_total")
            shown.update(acceptance())
            return shown[d.name] == pytest.approx(100.0 * accepted / drafted)

        assert wait_until(status_matches_metrics, timeout_s=20.0, interval_s=0.5), (method, shown)


@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_is_reproducible_and_the_same_disaggregated_and_colocated(
    method: str, workers: dict[str, ChildProcess], reference: Engine
) -> None:
    p, d = workers["prefill"], workers[method]
    prompts = repeated_prompts(reference.model_config.vocab_size, seed=23)
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=20, seed=50 + i) for i in range(len(prompts))
    ]
    first = run_concurrently(p, d, f"seeded-{method}-a", prompts, params)
    second = run_concurrently(p, d, f"seeded-{method}-b", prompts, params)
    assert [t for t, _ in second] == [t for t, _ in first]
    for i, (prompt, sampling) in enumerate(zip(prompts, params)):
        colocated = [
            t for delta in decode_stream(d, f"seeded-{method}-local-{i}", prompt, sampling) for t in delta.token_ids
        ]
        assert colocated == first[i][0], f"request {i}"
    # sampling happened: different seeds of one prompt give different outputs
    other, _ = disaggregated(p, d, f"seeded-{method}-other", prompts[0], dataclasses.replace(params[0], seed=7))
    assert other != first[0][0]
