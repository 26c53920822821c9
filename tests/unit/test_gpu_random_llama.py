"""The GPU check's random Llama: its config is Llama-3-8B's layers, its weights follow the stated
recipe exactly, and the checkpoint is real HF format (transformers and the engine load it and
agree on greedy tokens). Generated here on the CPU at a tiny width, as the check does on CUDA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tandem.engine import Engine, SamplingParams
from tandem.engine.tiny_model import TINY_VOCAB_SIZE
from tandem.engine.tokenizer import Tokenizer
from tandem.loadtest.gpu.random_llama import (
    LLAMA3_8B_4_LAYERS,
    LlamaShape,
    llama_config,
    weight_shapes,
    write_random_llama,
)
from tests.unit.oracle import hf_greedy

TINY = LlamaShape(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def test_llama3_8b_shape_config() -> None:
    config = llama_config(LLAMA3_8B_4_LAYERS, TINY_VOCAB_SIZE, "bfloat16")
    picked = {
        key: config[key]
        for key in (
            "architectures",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rope_theta",
            "rms_norm_eps",
            "vocab_size",
            "dtype",
            "torch_dtype",
            "tie_word_embeddings",
            "rope_scaling",
        )
    }
    assert picked == {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "vocab_size": 512,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "rope_scaling": None,
    }
    # per layer: 2 norms + q,k,v,o (4096 * (2 * 4096 + 2 * 1024)) + MLP (3 * 4096 * 14336)
    assert LLAMA3_8B_4_LAYERS.num_parameters(512) == 4 * 218_112_000 + 4096 + 2 * 512 * 4096 == 876_646_400
    with pytest.raises(ValueError, match="dtype must be one of"):
        llama_config(TINY, 512, "float64")
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        LlamaShape(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=6, num_kv_heads=4, head_dim=16)


def test_weights_follow_the_recipe_exactly(tmp_path: Path) -> None:
    path = write_random_llama(tmp_path / "m", TINY, "float32", "cpu", seed=3)
    generator = torch.Generator(device="cpu").manual_seed(3)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(name for name, _ in weight_shapes(TINY, TINY_VOCAB_SIZE))
        for name, size in weight_shapes(TINY, TINY_VOCAB_SIZE):
            draw = torch.randn(size, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                expected = draw * 0.1 + 1.0
            elif name == "model.embed_tokens.weight":
                expected = draw
            else:
                expected = draw / math.sqrt(size[-1])
            assert torch.allclose(f.get_tensor(name), expected, rtol=1e-6, atol=0), name
    again = write_random_llama(tmp_path / "again", TINY, "float32", "cpu", seed=3)
    other = write_random_llama(tmp_path / "other", TINY, "float32", "cpu", seed=4)
    weights = (path / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights


def test_checkpoint_is_hf_format_and_engine_equals_transformers(tmp_path: Path) -> None:
    path = write_random_llama(tmp_path / "m", TINY, "float32", "cpu")
    assert sorted(p.name for p in path.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    tokenizer = Tokenizer.from_pretrained(path)
    assert tokenizer.vocab_size == json.loads((path / "config.json").read_text())["vocab_size"] == 512
    prompts = [tokenizer.encode(text) for text in ("The quick brown fox", "Once upon a time, in a small town")]
    engine = Engine.from_pretrained(path, num_blocks=64)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, output in zip(prompts, outputs):
        assert list(output.token_ids) == hf_greedy(path, prompt, 24)
        tokenizer.decode(list(output.token_ids))  # every generated id decodes


def test_bf16_checkpoint_holds_bf16_tensors_and_serves(tmp_path: Path) -> None:
    path = write_random_llama(tmp_path / "m", TINY, "bfloat16", "cpu")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    engine = Engine.from_pretrained(path, num_blocks=64)
    assert engine.model_config.dtype is torch.bfloat16
    [output] = engine.generate([[0, 40, 41, 42]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(output.token_ids) == 5
