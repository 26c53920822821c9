"""Linear layers that keep quantized weights resident: FP8 W8A8 and INT8 W8A16.

Both compute `y = x @ W^T + b` for `x` [tokens, in_features] and hold, as parameters with
the checkpoint's names, `weight` [out, in] in its quantized dtype (float8_e4m3fn or int8),
`weight_scale` (float32) and an optional `bias` in the model's dtype. No dequantized copy of
a weight is kept: the memory a layer occupies is its quantized size (`resident_weight_bytes`).

The loader builds them on the meta device in place of `nn.Linear` (`replace_linears`) and
assigns the loaded tensors; nothing changes them afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from tandem.engine.quant.fp8 import FP8_DTYPE, quantize_per_token, supports_scaled_mm
from tandem.engine.quant.scheme import LinearScheme, WeightKind


class QuantizedLinear(nn.Module):
    """Base: the quantized parameters (`QUANTIZED_PARAMS`) keep their own dtype when loading;
    only `bias` takes the model's dtype."""

    QUANTIZED_PARAMS: ClassVar[tuple[str, ...]] = ("weight", "weight_scale")
    WEIGHT_DTYPE: ClassVar[torch.dtype]

    def __init__(self, in_features: int, out_features: int, scale_columns: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=self.WEIGHT_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, scale_columns, dtype=torch.float32), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None


class Fp8Linear(QuantizedLinear):
    """FP8 W8A8: fp8 weights with per-output-channel scales, activations quantized to fp8 per
    token at every call (dynamic scales, `quantize_per_token`).

    On CUDA with compute capability >= 8.9 and a bfloat16 model, the matmul is
    `torch._scaled_mm` on the fp8 operands with row-wise scales (both dimensions must be
    multiples of 16, as the FP8 tensor cores need). Everywhere else, CPU included, the layer
    dequantizes inside `forward`: `x_q * x_scale` and `W_q * W_scale` in the activation dtype,
    then a plain matmul. Both paths compute the same quantized product; they differ only in
    accumulation order. The dequantized weight is a temporary of one call, never kept.
    """

    WEIGHT_DTYPE = FP8_DTYPE

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, 1, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        x_q, x_scale = quantize_per_token(x)  # fp8 [tokens, in], [tokens, 1]
        if self._use_scaled_mm(x):
            out = torch._scaled_mm(
                x_q,
                self.weight.t(),  # [in, out], column-major as _scaled_mm requires
                scale_a=x_scale.float(),
                scale_b=self.weight_scale.t(),  # [1, out]
                out_dtype=x.dtype,
            )
        else:
            x_deq = x_q.to(x_scale.dtype) * x_scale
            w_deq = (self.weight.to(torch.float32) * self.weight_scale).to(x.dtype)
            out = nn.functional.linear(x_deq.to(x.dtype), w_deq)
        return out if self.bias is None else out + self.bias

    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        return (
            x.dtype == torch.bfloat16
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and supports_scaled_mm(x.device)
        )


class Int8Linear(QuantizedLinear):
    """INT8 W8A16: int8 weights with symmetric scales per output channel (`group_size` None,
    `weight_scale` [out, 1]) or per group of `group_size` input columns (`weight_scale`
    [out, in / group_size]); activations stay in the model's dtype.

    On every device the layer dequantizes inside `forward`: `W_q * scale` (scales repeated
    over their group) in float32, cast to the activation dtype, then a plain matmul. The
    dequantized weight is a temporary of one call, never kept.
    """

    WEIGHT_DTYPE = torch.int8

    def __init__(
        self, in_features: int, out_features: int, group_size: int | None, bias: bool, dtype: torch.dtype
    ) -> None:
        if group_size is not None and in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
        self.group_size = group_size
        super().__init__(in_features, out_features, 1 if group_size is None else in_features // group_size, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, in] -> [tokens, out]
        scale: torch.Tensor = self.weight_scale  # [out, 1] or [out, groups]
        if self.group_size is not None:
            scale = scale.repeat_interleave(self.group_size, dim=1)  # [out, in]
        w_deq = (self.weight.to(torch.float32) * scale).to(x.dtype)
        return nn.functional.linear(x, w_deq, self.bias)


def make_linear(scheme: LinearScheme, like: nn.Linear, dtype: torch.dtype) -> QuantizedLinear:
    """The quantized layer for `scheme` with `like`'s shape and bias, on the current device."""
    bias = like.bias is not None
    if scheme.kind is WeightKind.FP8_W8A8:
        return Fp8Linear(like.in_features, like.out_features, bias, dtype)
    return Int8Linear(like.in_features, like.out_features, scheme.group_size, bias, dtype)


def replace_linears(model: nn.Module, layers: Mapping[str, LinearScheme], dtype: torch.dtype) -> None:
    """Swap each named `nn.Linear` of `model` for its quantized layer (call on the meta device)."""
    for name, scheme in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        like = getattr(parent, child)
        if not isinstance(like, nn.Linear):
            raise ValueError(f"{name} is a {type(like).__name__}, not a linear layer")
        setattr(parent, child, make_linear(scheme, like, dtype))


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter of `model` as held in memory (tied tensors counted once).
    Buffers (the rotary cos/sin table) are derived, not weights, and are not counted."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
