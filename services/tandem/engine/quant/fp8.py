"""FP8 (float8_e4m3fn) quantization math, shared by the FP8 linear layer and load-time quantization.

Symmetric scales, as vLLM and compressed-tensors compute them:
- weights, per output channel: `scale[o] = amax(|W[o, :]|) / 448`, `W_q = fp8(W / scale)`;
- activations, per token (row), at every call: `scale[t] = amax(|x[t, :]|) / 448`.
448 is the largest finite float8_e4m3fn. A zero row's scale would be 0; it is replaced by
the dtype's machine epsilon (compressed-tensors' rule), so a zero row quantizes to zeros.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in] (any float dtype) -> (fp8 weight [out, in], float32 scale [out, 1])."""
    w = weight.float()
    scale = _nonzero(w.abs().amax(dim=1, keepdim=True) / FP8_MAX)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [tokens, in] -> (fp8 [tokens, in], scale [tokens, 1] in x's dtype).

    The scale is computed in x's dtype, as compressed-tensors does, so that a float32 model
    matches transformers' emulation bit for bit before the matmul.
    """
    scale = _nonzero(x.abs().amax(dim=-1, keepdim=True) / FP8_MAX)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def supports_scaled_mm(device: torch.device) -> bool:
    """True on CUDA devices of compute capability 8.9 or higher (Ada, Hopper, Blackwell),
    the ones with FP8 tensor cores that `torch._scaled_mm` runs on."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
