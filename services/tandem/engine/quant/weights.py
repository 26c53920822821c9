"""Checkpoint tensors -> the tensors a quantized linear layer holds.

The loader reads safetensors one tensor at a time and passes each through
`QuantizedWeights.convert`, which returns the parameters to assign (zero, one or two):
- "float-quantized" (FP8) and "int-quantized" (INT8) tensors are stored as held:
  `weight` (fp8 / int8) and `weight_scale` pass through.
- "pack-quantized" (INT8) stores `weight_packed` (int32, four int8 values per word) and
  `weight_shape`; once both of a layer are read, the compressed-tensors library unpacks them
  into `weight` int8 [out, in].
- "load-time" (`--quantization fp8`): a full-precision `weight` is quantized per output
  channel on the target device (`quantize_weight_per_channel`) into `weight` + `weight_scale`.
- `weight_zero_point` of a symmetric scheme must be all zeros, and is dropped.
`finish()` reports a layer whose packed weight arrived without its shape (or the reverse).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tandem.engine.quant.fp8 import quantize_weight_per_channel
from tandem.engine.quant.scheme import LinearScheme


class QuantizedWeights:
    def __init__(self, layers: Mapping[str, LinearScheme], device: torch.device) -> None:
        self._layers = layers
        self._device = device
        self._packed: dict[str, dict[str, torch.Tensor]] = {}  # layer -> weight_packed / weight_shape

    def convert(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The parameters to assign for checkpoint tensor `name` (already on the target device
        for load-time quantization; any device otherwise)."""
        layer, _, leaf = name.rpartition(".")
        scheme = self._layers.get(layer)
        if scheme is None:
            return [(name, tensor)]
        if leaf == "weight_zero_point":
            if torch.count_nonzero(tensor):
                raise ValueError(f"{name}: nonzero zero points (an asymmetric scheme) are not supported")
            return []
        if scheme.storage == "load-time" and leaf == "weight":
            weight, scale = quantize_weight_per_channel(tensor.to(self._device))
            return [(f"{layer}.weight", weight), (f"{layer}.weight_scale", scale)]
        if scheme.storage == "pack-quantized" and leaf in ("weight_packed", "weight_shape"):
            parts = self._packed.setdefault(layer, {})
            parts[leaf] = tensor
            if len(parts) < 2:
                return []
            del self._packed[layer]
            return [(f"{layer}.weight", _unpack_int8(layer, parts["weight_packed"], parts["weight_shape"]))]
        return [(name, tensor)]

    def finish(self) -> None:
        for layer, parts in sorted(self._packed.items()):
            missing = {"weight_packed", "weight_shape"} - set(parts)
            raise ValueError(f"pack-quantized layer {layer!r} has no {sorted(missing)[0]} tensor")


def _unpack_int8(layer: str, packed: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # type: ignore[import-untyped]

    out_features, in_features = (int(v) for v in shape.tolist())
    if packed.dtype != torch.int32 or packed.shape[0] != out_features or packed.shape[1] * 4 < in_features:
        raise ValueError(
            f"{layer}.weight_packed: {packed.dtype} {tuple(packed.shape)} does not hold 8-bit values "
            f"of shape ({out_features}, {in_features})"
        )
    return unpack_from_int32(packed, 8, torch.Size((out_features, in_features))).to(torch.int8)
