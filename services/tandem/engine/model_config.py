"""What the engine needs to know about a checkpoint, parsed and validated from `config.json`.

Supports the Llama family: Llama 2/3 (with `default`, `linear` and `llama3` rope scaling),
Mistral (sliding window disabled, see `max_model_len`), and Qwen2 (qkv bias, tied embeddings).
Both config forms are read: `rope_theta` + `rope_scaling` (transformers 4) and
`rope_parameters` (transformers 5).

No torch at import time: the gateway reads this config (vocab size, context length) and must
not load torch. `dtype` resolves the dtype name to a `torch.dtype` when the engine asks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# architecture name in config.json -> model family implemented in services/tandem/engine/models
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# config.json "dtype" / "torch_dtype" values the engine runs; each is a `torch` attribute.
DTYPE_NAMES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings. `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    dtype_name: str  # one of DTYPE_NAMES
    eos_token_ids: frozenset[int]
    sliding_window: int | None = None

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def dtype(self) -> torch.dtype:
        """The weights' and activations' dtype (imports torch: engine side only)."""
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def max_model_len(self) -> int:
        """Longest sequence the engine serves exactly. A Mistral sliding window shorter than
        the position limit caps it (attention is full, so it is exact within the window)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @staticmethod
    def from_dir(path: Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"model directory {path} has no config.json")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
        generation = Path(path) / "generation_config.json"
        gen_raw = json.loads(generation.read_text()) if generation.is_file() else {}
        return ModelConfig.from_dict(raw, source=str(config_path), generation_config=gen_raw)

    @staticmethod
    def from_dict(raw: dict, source: str = "config.json", generation_config: dict | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> int | float:
            if key not in raw:
                raise ValueError(f"{source}: missing required field {key!r}")
            return raw[key]

        hidden_size = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        head_dim = int(raw.get("head_dim") or hidden_size // num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: unsupported hidden_act {raw.get('hidden_act')!r}; only 'silu'")
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in DTYPE_NAMES:
            raise ValueError(f"{source}: unsupported dtype {dtype_name!r}; supported: {sorted(DTYPE_NAMES)}")
        sliding_window = raw.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding_window = None
        eos = (generation_config or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        return ModelConfig(
            architecture=arch,
            hidden_size=hidden_size,
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(raw, source),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
            dtype_name=dtype_name,
            eos_token_ids=eos_ids,
            sliding_window=int(sliding_window) if sliding_window else None,
        )


def _parse_rope(raw: dict, source: str) -> RopeConfig:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if float(merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor is not supported")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )
