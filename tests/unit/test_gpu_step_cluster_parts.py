"""The cluster step's pure parts: its GPU configuration, `tandem up`'s flags, the prompts, the
agreement of streamed tokens with the engine's, and what makes the step fail. The whole step
runs on CPU in tests/e2e/test_gpu_step_cluster.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tandem.common.request import FinishReason, TokenLogprob
from tandem.engine.outputs import GenerationOutput
from tandem.engine.tiny_model import BOS_TOKEN_ID, write_tokenizer
from tandem.loadtest.gpu.agreement import Kind, Verdict, compare, verdict
from tandem.loadtest.gpu.gateway_load import LoadResult, Stream
from tandem.loadtest.gpu.random_llama import LLAMA3_8B_4_LAYERS
from tandem.loadtest.gpu.step_cluster import (
    GPU_CHECK,
    NO_CUDA,
    build_prompts,
    problems,
    run,
    up_flags,
)
from tandem.loadtest.gpu.steps import Skip, step_named
from tandem.loadtest.gpu.up_process import ProcessExit
from tandem.loadtest.record import ErrorKind, RequestRecord


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_run_skips_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(Skip) as skip:
        run(tmp_path)
    assert str(skip.value) == NO_CUDA
    assert list(tmp_path.iterdir()) == []


def test_gpu_check_is_the_issues_run() -> None:
    assert step_named("cluster").target == "tandem.loadtest.gpu.step_cluster:run"
    assert (GPU_CHECK.device, GPU_CHECK.attention_backend, GPU_CHECK.dtype) == ("cuda", "triton", "bfloat16")
    assert GPU_CHECK.shape == LLAMA3_8B_4_LAYERS
    assert (GPU_CHECK.num_streams, GPU_CHECK.prompt_tokens, GPU_CHECK.max_tokens) == (64, (128, 512), 128)
    assert GPU_CHECK.near_tie_nats == 0.125


def test_up_flags() -> None:
    assert up_flags(GPU_CHECK, Path("/w/random-llama")) == [
        *("--prefill", "1", "--decode", "1", "--model", "/w/random-llama"),
        *("--attention-backend", "triton", "--device", "cuda", "--dtype", "bfloat16"),
        *("--kv-cache-mib", "2048", "--local-prefill-max-tokens", "0"),
        *("--host", "127.0.0.1", "--port", "0", "--ready-timeout-s", "75.0", "--drain-timeout-s", "10"),
    ]


def test_cluster_check_validates() -> None:
    with pytest.raises(ValueError, match=r"prompt_tokens must be \(low, high\) with 2 <= low <= high, got \(9, 8\)"):
        dataclasses.replace(GPU_CHECK, prompt_tokens=(9, 8))
    with pytest.raises(ValueError, match="near_tie_nats must be >= 0, got -0.1"):
        dataclasses.replace(GPU_CHECK, near_tie_nats=-0.1)


def test_prompts_have_the_spread_lengths_and_are_fixed(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    prompts = build_prompts(tmp_path, 5, (128, 512), seed=0)
    assert [len(p) for p in prompts] == [128, 224, 320, 416, 512]
    assert all(p[0] == BOS_TOKEN_ID and all(4 <= t < 512 for t in p[1:]) for p in prompts)
    assert build_prompts(tmp_path, 5, (128, 512), seed=0) == prompts
    assert build_prompts(tmp_path, 5, (128, 512), seed=1) != prompts
    assert len({tuple(p[:16]) for p in prompts}) == 5  # distinct from their first block
    assert [len(p) for p in build_prompts(tmp_path, 1, (16, 48), seed=0)] == [16]


def _output(token_ids: list[int], tops: list[list[tuple[int, float]]], prompt_len: int = 7) -> GenerationOutput:
    logprobs = tuple(TokenLogprob(t, top[0][1], tuple(top)) for t, top in zip(token_ids, tops))
    return GenerationOutput("r", tuple(range(prompt_len)), tuple(token_ids), FinishReason.LENGTH, logprobs, 0, None)


EXPECTED = _output([10, 11, 12], [[(10, -0.5)], [(11, -0.70), (40, -0.75), (41, -2.0)], [(12, -0.1)]])


def test_identical_tokens_agree() -> None:
    assert verdict(0, [10, 11, 12], EXPECTED, 0.0) == Verdict(0, Kind.IDENTICAL, 3)


def test_a_divergence_at_a_near_tie_agrees_only_within_the_tolerance() -> None:
    detail = (
        "request 4 (7 prompt tokens) first differs at output position 1: cluster 40, engine 11; "
        "the engine's top logprobs there: 11 -0.7000, 40 -0.7500, 41 -2.0000"
    )
    assert verdict(4, [10, 40, 99], EXPECTED, 0.125) == Verdict(4, Kind.NEAR_TIE, 1, detail)
    assert verdict(4, [10, 40, 99], EXPECTED, 0.05) == Verdict(4, Kind.MISMATCH, 1, detail)
    assert verdict(4, [10, 40, 99], EXPECTED, 0.0) == Verdict(4, Kind.MISMATCH, 1, detail)
    assert verdict(4, [10, 41], EXPECTED, 0.125).kind is Kind.MISMATCH  # 1.3 nats below
    assert verdict(4, [10, 77, 12], EXPECTED, 100.0).kind is Kind.MISMATCH  # not in the top 5


def test_a_different_length_is_a_mismatch() -> None:
    assert verdict(2, [10, 11], EXPECTED, 0.125) == Verdict(
        2, Kind.MISMATCH, 2, "request 2: the cluster streamed 2 tokens, the engine generated 3"
    )
    assert [v.kind for v in compare([[10, 11, 12], [9]], [EXPECTED, EXPECTED], 0.0)] == [Kind.IDENTICAL, Kind.MISMATCH]
    with pytest.raises(ValueError, match="1 streams to compare with 2 engine outputs"):
        compare([[10]], [EXPECTED, EXPECTED], 0.0)


def _stream(request_id: str, error: ErrorKind | None = None, message: str = "") -> Stream:
    record = RequestRecord(request_id, 0.0, 1.0, (0.5,), 7, 1, error, 200, message)
    return Stream(record, (10,))


def test_problems_name_the_first_failed_stream_disagreement_and_unclean_stop() -> None:
    ok_load = LoadResult((_stream("stream-0"), _stream("stream-1")), 1.0)
    clean = [ProcessExit("tandem up", 10, "exit code 0"), ProcessExit("gateway", 11, "stopped")]
    identical = [Verdict(0, Kind.IDENTICAL, 3), Verdict(1, Kind.NEAR_TIE, 1, "near")]
    assert problems(ok_load, identical, clean) == []
    bad_load = LoadResult((_stream("stream-0"), _stream("stream-1", ErrorKind.HTTP_5XX, "boom")), 1.0)
    mismatched = [Verdict(0, Kind.MISMATCH, 0, "request 0 differs"), Verdict(1, Kind.MISMATCH, 2, "request 1")]
    unclean = [ProcessExit("tandem up", 10, "exit code -9"), ProcessExit("decode-0", 12, "killed by pid")]
    assert problems(bad_load, mismatched, unclean) == [
        "1 of 2 streams failed; stream-1: boom",
        "2 of 2 requests disagree with the engine; request 0 differs",
        "not every process stopped on SIGTERM: tandem up (pid 10) exit code -9, decode-0 (pid 12) killed by pid",
    ]
