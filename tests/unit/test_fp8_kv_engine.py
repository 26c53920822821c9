"""The engine with an FP8 KV cache: pool sizing, the scale rule, and teacher-forced closeness.

Closeness (issue 18 Acceptance): the fp8 engine's greedy tokens, fed to the float32 engine
with prompt logits; at those positions the float32 argmax is the fp8 token in >= 85% of them,
and the mean |logprob difference| of the chosen tokens is <= 0.1. Free-running agreement is
not the measure (random models diverge after the first differing token).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tandem.engine import Engine, EngineConfig, SamplingParams
from tandem.engine.kv_cache import KVScales
from tandem.loadtest.suite.quantization import teacher_forced_quality
from tests.conftest import random_prompts

MiB = 1 << 20


def test_fp8_pool_holds_twice_the_blocks_of_bf16(tiny_model_dir: Path) -> None:
    """Tiny model: 2 layers, 2 KV heads x 16, block 16 -> 2048 elements of K and V per block:
    4096 bytes in bfloat16, 2048 in fp8, 8192 in float32; a 1 MiB budget holds 256, 512, 128."""
    counts = {}
    for dtype, kv in (("bfloat16", "auto"), ("float32", "auto"), ("float32", "fp8"), ("bfloat16", "fp8_e5m2")):
        engine = Engine.from_pretrained(tiny_model_dir, dtype=dtype, kv_cache_dtype=kv, kv_cache_bytes=MiB)
        counts[(dtype, kv)] = (engine.pool.num_blocks, engine.kv_spec.bytes_per_token, engine.kv_caches[0].dtype)
    assert counts == {
        ("bfloat16", "auto"): (256, 256, torch.bfloat16),
        ("float32", "auto"): (128, 512, torch.float32),
        ("float32", "fp8"): (512, 128, torch.float8_e4m3fn),
        ("bfloat16", "fp8_e5m2"): (512, 128, torch.float8_e5m2),
    }


def test_kv_cache_dtype_is_validated() -> None:
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2'\)"):
        EngineConfig(kv_cache_dtype="int8")


def _checkpoint_with_scales(src: Path, dst: Path, scales: dict[str, float]) -> Path:
    """A copy of `src`'s config.json with a kv_cache_scheme, and a safetensors file of scales."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
    }
    (dst / "config.json").write_text(json.dumps(config))
    save_file({name: torch.tensor(value) for name, value in scales.items()}, str(dst / "scales.safetensors"))
    return dst


def test_scales_come_from_the_checkpoint_scheme(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert KVScales.load(tiny_model_dir, 2) == KVScales((1.0, 1.0), (1.0, 1.0), "default")
    scales = {
        "model.layers.0.self_attn.k_scale": 0.5,
        "model.layers.0.self_attn.v_scale": 0.25,
        "model.layers.1.self_attn.k_proj.output_scale": 2.0,  # the older compressed-tensors name
        "model.layers.1.self_attn.v_scale": 0.125,
    }
    loaded = KVScales.load(_checkpoint_with_scales(tiny_model_dir, tmp_path / "ok", scales), 2)
    assert loaded == KVScales((0.5, 2.0), (0.25, 0.125), "checkpoint")
    assert loaded.digest != KVScales.default(2).digest
    assert loaded.digest == KVScales((0.5, 2.0), (0.25, 0.125), "checkpoint").digest
    del scales["model.layers.1.self_attn.v_scale"]
    with pytest.raises(ValueError, match=r"kv_cache_scheme but the weights have no model.layers.1.self_attn.v_scale"):
        KVScales.load(_checkpoint_with_scales(tiny_model_dir, tmp_path / "missing", scales), 2)


def test_a_checkpoint_with_kv_scales_loads_and_serves_with_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The scale tensors sit beside the weights (llm-compressor's layout): the loader leaves
    them to KVScales, and the engine's fp8 cache uses them."""
    scales = {f"model.layers.{i}.self_attn.{kv}_scale": 0.5 + i for i in range(2) for kv in "kv"}
    ckpt = _checkpoint_with_scales(tiny_model_dir, tmp_path / "ckpt", scales)
    for extra in tiny_model_dir.iterdir():
        if extra.name != "config.json":
            shutil.copy(extra, ckpt / extra.name)
    engine = Engine.from_pretrained(ckpt, kv_cache_dtype="fp8", num_blocks=16)
    assert engine.kv_scales == KVScales((0.5, 1.5), (0.5, 1.5), "checkpoint")
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out.token_ids) == 4
    engine.check_integrity()


@pytest.mark.parametrize("name", ["tiny", "llama_gqa_llama3_rope"])
def test_teacher_forced_closeness_to_float32(model_dirs: dict[str, Path], name: str) -> None:
    reference = Engine.from_pretrained(model_dirs[name], num_blocks=256)
    fp8 = Engine.from_pretrained(model_dirs[name], num_blocks=256, kv_cache_dtype="fp8")
    prompts = random_prompts([5, 17, 40, 64], reference.model_config.vocab_size, seed=41)
    quality = teacher_forced_quality(fp8, reference, prompts, max_tokens=24)
    assert quality.num_tokens == 96
    assert quality.argmax_agreement >= 0.85, quality
    assert quality.mean_abs_logprob_error <= 0.1, quality
    assert quality.mean_abs_logprob_error > 0.0  # the cache is quantized: not the float32 engine
    fp8.check_integrity()
    reference.check_integrity()
