"""The engine with the `triton` attention backend (interpreted on CPU) produces the same
greedy tokens as with the `torch` backend: plain, prefix-cache hit, and chunked prefill."""

from __future__ import annotations

from pathlib import Path

from tandem.engine import Engine, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _run(model_dir: Path, backend: str, prompts: list[list[int]], **options: object) -> tuple[list[list[int]], Engine]:
    engine = Engine.from_pretrained(model_dir, num_blocks=32, attention_backend=backend, **options)
    outputs = [list(o.token_ids) for o in engine.generate(prompts[:2], GREEDY)]
    # a later request that reuses the first prompt's cached blocks
    outputs += [list(o.token_ids) for o in engine.generate(prompts[2:], GREEDY)]
    engine.check_integrity()
    assert engine.is_drained()
    return outputs, engine


def test_triton_backend_matches_torch_backend(tiny_model_dir: Path) -> None:
    a, b = random_prompts([37, 9], 512, seed=41)
    prompts = [a, b, a[:32] + b[:5]]
    expected, torch_engine = _run(tiny_model_dir, "torch", prompts)
    got, triton_engine = _run(tiny_model_dir, "triton", prompts)
    assert triton_engine.backend.name == "triton"
    assert got == expected
    assert triton_engine.stats.num_prefix_hit_tokens == 32 == torch_engine.stats.num_prefix_hit_tokens


def test_triton_backend_chunked_prefill_matches(tiny_model_dir: Path) -> None:
    prompts = random_prompts([29, 6, 20], 512, seed=42)
    expected, _ = _run(tiny_model_dir, "torch", prompts)
    got, engine = _run(tiny_model_dir, "triton", prompts, max_prefill_chunk_tokens=8)
    assert got == expected
    # 29 tokens in chunks of 8 take 4 steps, then 3 decode steps; then 3 + 3 for the 20-token prompt
    assert engine.stats.num_steps == 13
