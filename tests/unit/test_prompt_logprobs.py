"""Prompt logprobs and `max_tokens=0` (the prompt only) against transformers' log-softmax of
the prompt logits (1e-4, float32), with and without a prefix-cache hit and chunked prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.common.request import FinishReason, SamplingParams
from tandem.engine import Engine
from tests.conftest import random_prompts
from tests.unit.oracle import hf_prompt_logits


def _check(path: Path, prompt: list[int], out_lps, k: int) -> None:
    ref = torch.log_softmax(hf_prompt_logits(path, prompt), dim=-1)  # [n, vocab]
    assert out_lps is not None and len(out_lps.logprobs) == len(prompt) - 1
    for i, (lp, rank) in enumerate(zip(out_lps.logprobs, out_lps.ranks)):
        row = ref[i]
        assert lp.token_id == prompt[i + 1]
        assert lp.logprob == pytest.approx(float(row[prompt[i + 1]]), abs=1e-4)
        assert rank == int((row > row[prompt[i + 1]]).sum()) + 1
        values, ids = row.topk(k)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("chunk", [None, 5])
def test_prompt_only_equals_transformers_with_and_without_a_cache_hit(tiny_model_dir: Path, chunk: int | None) -> None:
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64, max_prefill_chunk_tokens=chunk)
    (prompt,) = random_prompts([37], engine.model_config.vocab_size, seed=3)
    warm = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert warm.finish_reason is FinishReason.LENGTH
    p = SamplingParams(max_tokens=0, prompt_logprobs=3, logprobs=1)
    first, second = (engine.generate([prompt], p)[0] for _ in range(2))
    for out in (first, second):
        assert out.token_ids == () and out.finish_reason is FinishReason.LENGTH
        assert out.num_cached_tokens == 0  # prompt logprobs recompute the cached part
        _check(tiny_model_dir, prompt, out.prompt_logprobs, 3)
    assert first.prompt_logprobs == second.prompt_logprobs
    assert engine.is_drained()


def test_prompt_logprobs_with_generation_and_in_a_batch(tiny_model_dir: Path) -> None:
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64, max_prefill_chunk_tokens=16)
    prompts = random_prompts([20, 1, 9], engine.model_config.vocab_size, seed=4)
    params = [
        SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=0),
        SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2),
        SamplingParams(max_tokens=3, temperature=0.0),
    ]
    outs = engine.generate(prompts, params)
    _check(tiny_model_dir, prompts[0], outs[0].prompt_logprobs, 0)
    assert outs[1].prompt_logprobs is not None and outs[1].prompt_logprobs.logprobs == ()
    assert outs[2].prompt_logprobs is None
    assert [len(o.token_ids) for o in outs] == [3, 3, 3]
    assert engine.is_drained()


def test_prompt_logprobs_come_once_on_the_first_output(tiny_model_dir: Path) -> None:
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    (prompt,) = random_prompts([12], engine.model_config.vocab_size, seed=6)
    engine.add_request("r", prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert [o.prompt_logprobs is not None for o in outputs] == [True, False, False]
    _check(tiny_model_dir, prompt, outputs[0].prompt_logprobs, 1)
