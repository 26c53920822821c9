"""The engine with an FP8 KV cache: the Triton backend (interpreted on CPU) stores the same fp8
bytes as the torch backend and produces the same greedy tokens, with a prefix-cache hit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.engine import Engine, SamplingParams
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_triton_backend_matches_torch_backend(tiny_model_dir: Path, kv_cache_dtype: str) -> None:
    a, b = random_prompts([37, 9], 512, seed=43)
    runs = {}
    for backend in ("torch", "triton"):
        engine = Engine.from_pretrained(
            tiny_model_dir, num_blocks=32, attention_backend=backend, kv_cache_dtype=kv_cache_dtype
        )
        tokens = [list(o.token_ids) for o in engine.generate([a, b], GREEDY)]
        tokens += [list(o.token_ids) for o in engine.generate([a[:32] + b[:5]], GREEDY)]  # reuses a's 2 blocks
        assert engine.stats.num_prefix_hit_tokens == 32
        engine.check_integrity()
        runs[backend] = (tokens, engine.kv_caches)
    assert runs["triton"][0] == runs["torch"][0]
    # layer 0's K/V come from the same arithmetic in both backends (no attention before the
    # store), and both quantize with one rule: block 0 holds the same fp8 values
    torch_block = runs["torch"][1][0][:, 0].float()
    triton_block = runs["triton"][1][0][:, 0].float()
    assert runs["triton"][1][0].dtype == {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
    assert torch.count_nonzero(torch_block) > 1000  # 2 x 16 x 2 x 16 = 1024 K and V values each
    assert torch.equal(torch_block, triton_block)
