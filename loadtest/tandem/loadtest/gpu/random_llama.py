"""A random Llama in Hugging Face format, generated in seconds on the GPU (the GPU check's model).

    <path>/
        config.json              LlamaConfig of `shape` (Llama-3-8B layers: `LLAMA3_8B_4_LAYERS`)
        generation_config.json   bos / eos / pad ids of the tiny model's tokenizer
        model.safetensors        every tensor in `dtype`, HF Llama names
        tokenizer.json, tokenizer_config.json, chat_template.jinja   the tiny model's
                                 (`tandem.engine.tiny_model.write_tokenizer`)

The vocabulary is the tokenizer's (512 ids), so every id the model emits decodes. Weights are
drawn on `device` in float32 from one seeded `torch.Generator` of that device, tensor by tensor
in a fixed order, then cast to `dtype` and written with safetensors; transformers' own init is
never run (at Llama-3-8B widths it takes minutes on a CPU). The scale is that of
tests/conftest.py `save_random_model`, which gives peaked logits: embeddings ~ N(0, 1), every
linear weight [out, in] ~ N(0, 1/sqrt(in)); RMSNorm weights are 1 + N(0, 0.1) as in the tiny
model. The same (shape, dtype, device, seed) gives the same bytes; a CPU and a CUDA generator
draw different numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.engine.tiny_model import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    IM_END_TOKEN_ID,
    MODEL_MAX_LENGTH,
    TINY_LLAMA_CONFIG,
    llama_weight_shapes,
    write_tokenizer,
)

WEIGHTS_FILE = "model.safetensors"
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama decoder; `head_dim` * `num_heads` need not equal `hidden_size`."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = MODEL_MAX_LENGTH  # the tokenizer's model_max_length

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def num_parameters(self, vocab_size: int) -> int:
        """Weights of the whole model (untied embeddings and LM head)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = (
            2 * self.hidden_size + 2 * self.hidden_size * (q + kv) + 3 * self.hidden_size * self.intermediate_size
        )
        return self.num_layers * per_layer + self.hidden_size + 2 * vocab_size * self.hidden_size


# Llama-3-8B's layers (hidden 4096, MLP 14336, 32 query heads, 8 KV heads, head dim 128, rope
# theta 500000, RMSNorm eps 1e-5), four of them: about 0.88 B weights, 1.75 GB in bf16.
LLAMA3_8B_4_LAYERS = LlamaShape(
    hidden_size=4096, intermediate_size=14336, num_layers=4, num_heads=32, num_kv_heads=8, head_dim=128
)


def llama_config(shape: LlamaShape, vocab_size: int, dtype: str) -> dict[str, Any]:
    """config.json of a `shape` Llama: the tiny model's config with the sizes, rope theta, eps
    and dtype replaced."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in TINY_LLAMA_CONFIG.items()}
    config.update(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        max_position_embeddings=shape.max_position_embeddings,
        vocab_size=vocab_size,
        dtype=dtype,
        torch_dtype=dtype,
    )
    return config


def weight_shapes(shape: LlamaShape, vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes ([out_features, in_features] for linears), in draw
    order: the tiny model's list (one definition of a Llama checkpoint) at this shape."""
    return list(llama_weight_shapes(llama_config(shape, vocab_size, "float32")))


def write_random_llama(path: Path, shape: LlamaShape, dtype: str, device: str, seed: int = 0) -> Path:
    """Write the whole checkpoint into `path` (created if missing); returns `path`.

    Draws on `device` ("cuda", "cuda:N" or "cpu"); host memory holds the weights once, in
    `dtype`, while safetensors writes them.
    """
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path)
    config = llama_config(shape, vocab_size, dtype)
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json",
        # A chat turn ends with <|im_end|>; a plain completion with <|eos|> (as the tiny model).
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": [EOS_TOKEN_ID, IM_END_TOKEN_ID], "pad_token_id": EOS_TOKEN_ID},
    )
    target = getattr(torch, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, size in weight_shapes(shape, vocab_size):
            value = torch.randn(size, generator=generator, device=device, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = value.mul_(0.1).add_(1.0)
            elif name != "model.embed_tokens.weight":
                value = value.mul_(1.0 / math.sqrt(size[-1]))  # [out_features, in_features]
            tensors[name] = value.to(target).cpu().contiguous()
            del value
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it 0600
    return path


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
