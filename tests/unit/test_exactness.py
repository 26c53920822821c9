"""Greedy tokens and prompt logits equal transformers' on every engine path.

Each config runs 8 prompts of 1 to 300 tokens as one concurrent batch with 32 new tokens
each; transformers runs them one at a time. The paths: plain, chunked prefill (chunks smaller
and larger than a block), prefix-cache reuse, and preemption by recompute.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from tandem.engine import Engine, SamplingParams
from tests.conftest import random_prompts
from tests.unit.oracle import hf_greedy, hf_prompt_logits

LENGTHS = [1, 7, 16, 17, 48, 100, 213, 300]
MAX_NEW = 32
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def _expected(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(path, p, MAX_NEW) for p in prompts]


@pytest.fixture(scope="module")
def oracle(model_dirs: dict[str, Path]) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Per model: prompts and transformers' greedy continuations (computed once)."""
    result = {}
    for name, path in model_dirs.items():
        vocab = Engine.from_pretrained(path, num_blocks=1).model_config.vocab_size
        prompts = random_prompts(LENGTHS, vocab, seed=zlib.crc32(name.encode()))
        result[name] = (prompts, _expected(path, prompts))
    return result


@pytest.mark.parametrize("name", ["tiny", "llama_gqa_llama3_rope", "qwen2_bias_tied"])
def test_concurrent_batch_matches_transformers(name: str, model_dirs, oracle) -> None:
    path = model_dirs[name]
    prompts, expected = oracle[name]
    engine = Engine.from_pretrained(path, num_blocks=256)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, return_prompt_logits=True)
    outputs = engine.generate(prompts, params)
    assert [list(o.token_ids) for o in outputs] == expected
    for prompt, out in zip(prompts, outputs):
        ref = hf_prompt_logits(path, prompt)
        assert out.prompt_logits is not None and out.prompt_logits.shape == ref.shape
        torch.testing.assert_close(out.prompt_logits, ref, atol=1e-4, rtol=0)
    # every prompt started together: the first step holds all of them
    assert engine.stats.num_steps == MAX_NEW
    engine.check_integrity()
    assert engine.is_drained()


@pytest.mark.parametrize("chunk", [5, 40])
@pytest.mark.parametrize("name", ["tiny", "qwen2_bias_tied"])
def test_chunked_prefill_matches(name: str, chunk: int, model_dirs, oracle) -> None:
    prompts, expected = oracle[name]
    engine = Engine.from_pretrained(model_dirs[name], num_blocks=256, max_prefill_chunk_tokens=chunk)
    outputs = engine.generate(prompts, GREEDY)
    assert [list(o.token_ids) for o in outputs] == expected
    # the 300-token prompt alone needs ceil(300 / chunk) prefill steps before its first token
    assert engine.stats.num_steps >= -(-300 // chunk) + MAX_NEW - 1
    engine.check_integrity()
    assert engine.is_drained()


@pytest.mark.parametrize("name", ["tiny", "llama_gqa_llama3_rope"])
def test_prefix_cache_reuse_matches_and_skips_cached_tokens(name: str, model_dirs, oracle) -> None:
    path = model_dirs[name]
    prompts, _ = oracle[name]
    base = prompts[-1]  # 300 tokens
    engine = Engine.from_pretrained(path, num_blocks=256)
    first = engine.generate([base[:100]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second_prompt = base[:70] + prompts[4][:25]  # shares 70 tokens = 4 full blocks + 6
    computed_before = engine.stats.num_prompt_tokens_computed
    second = engine.generate([second_prompt], GREEDY)[0]
    assert second.num_cached_tokens == 64
    assert engine.stats.num_prompt_tokens_computed - computed_before == len(second_prompt) - 64
    assert engine.stats.num_prefix_hit_tokens == 64
    assert list(second.token_ids) == hf_greedy(path, second_prompt, MAX_NEW)
    # a fully cached prompt still computes its last token (the whole last block here)
    again = engine.generate([base[:96]], GREEDY)[0]
    assert again.num_cached_tokens == 80
    assert list(again.token_ids) == hf_greedy(path, base[:96], MAX_NEW)
    engine.check_integrity()
    assert engine.is_drained()


@pytest.mark.parametrize("name", ["tiny", "qwen2_bias_tied"])
def test_preemption_by_recompute_matches(name: str, model_dirs, oracle) -> None:
    prompts, expected = oracle[name]
    # 300 + 32 tokens need 21 blocks; 24 blocks cannot hold the batch at once
    engine = Engine.from_pretrained(model_dirs[name], num_blocks=24)
    outputs = engine.generate(prompts, GREEDY)
    assert engine.stats.num_preemptions > 0
    assert [list(o.token_ids) for o in outputs] == expected
    engine.check_integrity()
    assert engine.is_drained()
