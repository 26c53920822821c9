"""Which linear layers are quantized, and how: read from a checkpoint or chosen at load time.

Two sources, one result (`QuantPlan`: module name -> `LinearScheme`):

1. A compressed-tensors checkpoint, as llm-compressor writes it: `quantization_config` in
   config.json with `quant_method: "compressed-tensors"`. The `compressed-tensors` library
   parses the config (`QuantizationConfig`) and matches each config group's `targets` and the
   `ignore` list against the model's module names and classes (`is_match`), so the engine
   agrees with vLLM and transformers on which layers a checkpoint quantized.
2. `--quantization fp8` on an unquantized checkpoint: every decoder linear layer (not the
   embeddings, not `lm_head`, as vLLM does) gets FP8 W8A8 weights quantized while loading.

Supported schemes (anything else is a `ValueError` that names the scheme):
- FP8 W8A8: float8_e4m3 weights with one symmetric scale per output channel, and dynamic
  per-token symmetric FP8 activations (llm-compressor's `FP8_DYNAMIC`; format
  "float-quantized").
- INT8 W8A16: int8 weights with symmetric scales per output channel or per group of input
  columns, activations unquantized (llm-compressor's `W8A16`; format "pack-quantized" or
  "int-quantized").

The KV cache scheme (`kv_cache_scheme`) is not read here: the KV cache owns it.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# `EngineConfig.quantization` choices (vLLM's names). None: serve the checkpoint as it is.
QUANTIZATION_NAMES: tuple[str, ...] = ("fp8",)

FP8_STORAGE_FORMATS = ("float-quantized",)
INT8_STORAGE_FORMATS = ("pack-quantized", "int-quantized")


class WeightKind(enum.Enum):
    FP8_W8A8 = "fp8_w8a8"  # fp8 weights, per-channel scales, dynamic per-token fp8 activations
    INT8_W8A16 = "int8_w8a16"  # int8 weights, per-channel or per-group scales, 16/32-bit activations


@dataclass(frozen=True)
class LinearScheme:
    """How one linear layer's weights are stored on disk and held in memory.

    `group_size` is None for one scale per output channel (`weight_scale` [out, 1]), else the
    number of input columns that share a scale (`weight_scale` [out, in / group_size]).
    `storage` is the checkpoint's compressed-tensors format, or "load-time" when the engine
    quantizes a full-precision weight itself.
    """

    kind: WeightKind
    group_size: int | None
    storage: str


LOAD_TIME_FP8 = LinearScheme(WeightKind.FP8_W8A8, None, "load-time")


@dataclass(frozen=True)
class QuantPlan:
    """The quantized linear layers of one model: module name -> scheme. `method` names the
    source ("compressed-tensors" or "fp8") for the worker's startup line."""

    method: str
    layers: Mapping[str, LinearScheme]

    def describe(self) -> str:
        kinds = sorted({scheme.kind.value for scheme in self.layers.values()})
        return f"{self.method} ({', '.join(kinds)}, {len(self.layers)} linear layers)"


def read_quantization_config(model_dir: Path) -> dict[str, Any] | None:
    """The `quantization_config` object of `model_dir/config.json`, or None when absent."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    config = raw.get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"{model_dir}/config.json: quantization_config must be an object")
    return config


def plan_quantization(
    model: nn.Module, checkpoint_config: dict[str, Any] | None, option: str | None
) -> QuantPlan | None:
    """The plan for `model` (a freshly built, unquantized module tree with HF names).

    `checkpoint_config` is the checkpoint's `quantization_config` (None: unquantized);
    `option` is `EngineConfig.quantization`. Returns None when nothing is quantized.
    """
    if option is not None and option not in QUANTIZATION_NAMES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_NAMES} or None, got {option!r}")
    if checkpoint_config is not None and _kv_cache_only(checkpoint_config):
        checkpoint_config = None  # only the KV cache is quantized: kv_cache.KVScales reads its scales
    if checkpoint_config is not None:
        if option is not None:
            method = checkpoint_config.get("quant_method")
            raise ValueError(
                f"--quantization {option} quantizes an unquantized checkpoint at load time, but this "
                f"checkpoint is already quantized ({method}); leave --quantization unset"
            )
        return _plan_compressed_tensors(model, checkpoint_config)
    if option == "fp8":
        return QuantPlan("fp8", MappingProxyType({name: LOAD_TIME_FP8 for name in _decoder_linears(model)}))
    return None


def _kv_cache_only(raw: dict[str, Any]) -> bool:
    """A compressed-tensors config with a `kv_cache_scheme` and no weight group (llm-compressor's
    KV-cache-only recipe): the weights are as they are."""
    return bool(raw.get("kv_cache_scheme")) and not raw.get("config_groups")


def _decoder_linears(model: nn.Module) -> list[str]:
    from torch import nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]


def _plan_compressed_tensors(model: nn.Module, raw: dict[str, Any]) -> QuantPlan:
    method = raw.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"unsupported quantization method {method!r}; supported: 'compressed-tensors'")
    from compressed_tensors.quantization import QuantizationConfig  # type: ignore[import-untyped]
    from compressed_tensors.utils import is_match  # type: ignore[import-untyped]

    if raw.get("sparsity_config"):
        raise ValueError(f"unsupported compressed-tensors sparsity_config {raw['sparsity_config']!r}")
    if raw.get("transform_config"):
        raise ValueError("unsupported compressed-tensors transform_config (rotations are not implemented)")
    config = QuantizationConfig.model_validate(raw)
    layers: dict[str, LinearScheme] = {}
    for group_name, group in config.config_groups.items():
        if isinstance(group, list):
            raise ValueError(f"compressed-tensors group {group_name!r}: a bare preset list is not supported")
        scheme = _linear_scheme(group_name, group, group.format or config.format)
        for name, module in model.named_modules():
            if name in layers or not is_match(name, module, group.targets, config.ignore or ()):
                continue
            from torch import nn

            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"compressed-tensors group {group_name!r} quantizes {name!r}, "
                    f"a {type(module).__name__}; only linear layers can be quantized"
                )
            layers[name] = scheme
    if not layers:
        raise ValueError("the compressed-tensors config quantizes no linear layer of this model")
    return QuantPlan("compressed-tensors", MappingProxyType(layers))


def _linear_scheme(group_name: str, group: Any, storage: str) -> LinearScheme:
    """Map one compressed-tensors `QuantizationScheme` to a supported `LinearScheme`."""
    weights, inputs = group.weights, group.input_activations
    described = f"compressed-tensors group {group_name!r} ({describe_scheme(group, storage)})"
    if weights is None or group.output_activations is not None or weights.num_bits != 8 or not weights.symmetric:
        raise ValueError(f"unsupported {described}; {SUPPORTED}")
    if weights.dynamic or weights.block_structure is not None:
        raise ValueError(f"unsupported {described}; {SUPPORTED}")
    fp8_weights = weights.type == "float" and weights.strategy == "channel" and storage in FP8_STORAGE_FORMATS
    fp8_dynamic_tokens = (
        inputs is not None
        and inputs.type == "float"
        and inputs.num_bits == 8
        and inputs.strategy == "token"
        and inputs.dynamic is True
        and inputs.symmetric
    )
    if fp8_weights and fp8_dynamic_tokens:
        return LinearScheme(WeightKind.FP8_W8A8, None, storage)
    if weights.type == "int" and inputs is None and storage in INT8_STORAGE_FORMATS:
        if weights.strategy == "channel":
            return LinearScheme(WeightKind.INT8_W8A16, None, storage)
        if weights.strategy == "group" and weights.group_size and weights.group_size > 0:
            return LinearScheme(WeightKind.INT8_W8A16, int(weights.group_size), storage)
    raise ValueError(f"unsupported {described}; {SUPPORTED}")


SUPPORTED = (
    "supported: FP8 W8A8 (float8 weights per channel, dynamic per-token float8 activations, "
    "format float-quantized) and INT8 W8A16 (int8 weights per channel or group, format "
    "pack-quantized or int-quantized)"
)


def describe_scheme(group: Any, storage: str) -> str:
    """'weights int4 group(128) symmetric, input activations none, format pack-quantized'."""

    def args(value: Any) -> str:
        if value is None:
            return "none"
        strategy = f"group({value.group_size})" if value.strategy == "group" else str(value.strategy)
        parts = [f"{value.type}{value.num_bits}", strategy, "symmetric" if value.symmetric else "asymmetric"]
        if value.dynamic:
            parts.append("dynamic")
        return " ".join(parts)

    return f"weights {args(group.weights)}, input activations {args(group.input_activations)}, format {storage}"
