"""Shared fixtures: small random checkpoints saved once with transformers, in HF format.

Nothing is downloaded: every model is built from a config with a fixed seed and written to a
session temp folder, then loaded by both transformers (the oracle) and the engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tandem.common.plane_auth import TOKEN_ENV, ClusterToken

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The internal plane is locked by default: every worker, gateway and KV source a test starts
# inherits this token, and the test clients present it (tests/integration/workers.py).
os.environ.setdefault(TOKEN_ENV, ClusterToken.generate().secret)
# Triton decides interpreted vs compiled when a kernel module is imported, so this must be set
# before any test imports `kernels`: without CUDA, kernels run in the interpreter on CPU.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Random configs that the exactness tests cover besides the tiny default model.
MODEL_CONFIGS: dict[str, dict] = {
    "llama_gqa_llama3_rope": dict(
        model_type="llama",
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2_bias_tied": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=320,
        max_position_embeddings=1024,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=3,
    ),
}


def save_random_model(path: Path, config: dict, seed: int = 0) -> Path:
    """Build a transformers model from `config` with a fixed seed and save it to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)
    # Larger weights than the default init give peaked, tie-free logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tandem.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Name -> model directory for every exactness config, the tiny default model first."""
    dirs = {"tiny": tiny_model_dir}
    for name, config in MODEL_CONFIGS.items():
        dirs[name] = save_random_model(tmp_path_factory.mktemp(name), config)
    return dirs


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]
