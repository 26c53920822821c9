"""Build a model from a local Hugging Face directory: config, then safetensors weights.

Every problem is reported with the file and the tensor it concerns: a missing config or
weights file, an unsupported architecture, a missing tensor, a tensor of the wrong shape.

Quantized weights (`tandem.engine.quant`): when the checkpoint has a compressed-tensors
`quantization_config`, or `quantization="fp8"` asks for load-time FP8, the planned linear
layers are swapped for quantized ones before any weight is read, and each checkpoint tensor
goes through `QuantizedWeights.convert` on its way in. Quantized parameters keep their own
dtype (fp8 / int8 weights, float32 scales); every other tensor takes the model's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from tandem.engine.model_config import ModelConfig
from tandem.engine.models import MODEL_FAMILIES, LlamaForCausalLM
from tandem.engine.quant.linear import QuantizedLinear, replace_linears
from tandem.engine.quant.scheme import QuantPlan, plan_quantization, read_quantization_config
from tandem.engine.quant.weights import QuantizedWeights
from tandem.engine.rope import RotaryEmbedding

# Checkpoint tensors that are not the model's parameters: derived ones we recompute, and the
# FP8 KV cache scales of a `kv_cache_scheme`, which `kv_cache.KVScales` reads on its own.
_IGNORED_SUFFIXES = (
    "rotary_emb.inv_freq",
    "self_attn.k_scale",
    "self_attn.v_scale",
    "self_attn.k_proj.output_scale",
    "self_attn.v_proj.output_scale",
)


def load_model(
    path: Path, config: ModelConfig, device: torch.device, max_positions: int, quantization: str | None = None
) -> tuple[LlamaForCausalLM, QuantPlan | None]:
    """Instantiate the model family for `config` and load its weights from `path`.

    `quantization` is `EngineConfig.quantization` ("fp8": quantize an unquantized checkpoint
    while loading). Returns the model and the plan of what was quantized (None: nothing).
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {path} has no *.safetensors weights file")
    family = MODEL_FAMILIES[config.family]
    rotary = RotaryEmbedding(config.rope, config.head_dim, max_positions, config.dtype).to(device)
    with torch.device("meta"):
        model = family(config, rotary)
        plan = plan_quantization(model, read_quantization_config(path), quantization)
        if plan is not None:
            replace_linears(model, plan.layers, config.dtype)
    expected = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
    kept = _quantized_dtypes(model)
    converter = QuantizedWeights(plan.layers if plan is not None else {}, device)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for raw_name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                for name, tensor in converter.convert(raw_name, f.get_tensor(raw_name)):
                    if name not in expected:
                        if name == "lm_head.weight" and config.tie_word_embeddings:
                            continue
                        if name.endswith(_IGNORED_SUFFIXES):
                            continue
                        raise ValueError(f"{file.name}: unexpected tensor {name!r} for {_describe(config, plan)}")
                    shape, dtype = expected[name]
                    if tuple(tensor.shape) != shape:
                        raise ValueError(
                            f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {shape} from config.json"
                        )
                    if name in kept and tensor.dtype != dtype and dtype != torch.float32:
                        raise ValueError(f"{file.name}: tensor {name!r} is {tensor.dtype}, expected {dtype}")
                    state[name] = tensor.to(device=device, dtype=dtype if name in kept else config.dtype)
    converter.finish()
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"model directory {path}: weights missing {len(missing)} tensors: {shown}")
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval(), plan


def _quantized_dtypes(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that keep their declared dtype (quantized weights and scales)."""
    return {
        f"{name}.{param}"
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLinear)
        for param in module.QUANTIZED_PARAMS
    }


def _describe(config: ModelConfig, plan: QuantPlan | None) -> str:
    return config.architecture if plan is None else f"{config.architecture} quantized with {plan.describe()}"


def resolve_device(name: str) -> torch.device:
    """The engine's `--device`: "auto" is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
