"""Build a model from a local Hugging Face directory: config, then safetensors weights.

Every problem is reported with the file and the tensor it concerns: a missing config or
weights file, an unsupported architecture, a missing tensor, a tensor of the wrong shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from tandem.engine.model_config import ModelConfig
from tandem.engine.models import MODEL_FAMILIES, LlamaForCausalLM
from tandem.engine.rope import RotaryEmbedding

# Checkpoint tensors that are derived, not learned, and that we recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(path: Path, config: ModelConfig, device: torch.device, max_positions: int) -> LlamaForCausalLM:
    """Instantiate the model family for `config` and load its weights from `path`."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {path} has no *.safetensors weights file")
    family = MODEL_FAMILIES[config.family]
    rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions, config.dtype).to(device)
    with torch.device("meta"):
        model = family(config, rotary)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if name not in expected:
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    raise ValueError(f"{file.name}: unexpected tensor {name!r} for {config.architecture}")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    raise ValueError(
                        f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {expected[name]} from config.json"
                    )
                state[name] = tensor.to(device=device, dtype=config.dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"model directory {path}: weights missing {len(missing)} tensors: {shown}")
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval()
