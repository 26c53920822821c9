"""Argument checks that every kernel launcher runs before it computes a grid.

A Triton kernel reads raw pointers: a wrong dtype, a transposed view or a tensor on the wrong
device silently produces garbage instead of an exception. So each launcher validates its
arguments here first and raises `ValueError` naming the offending argument.

Device rule: a compiled kernel needs CUDA tensors; a kernel decorated while
`TRITON_INTERPRET=1` was set (the interpreter, used by the CPU test suite) needs CPU tensors.
Whether a kernel is interpreted is fixed when its module is imported, because `triton.jit`
reads `TRITON_INTERPRET` at decoration time, not at launch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)
# FP8 KV cache formats (vLLM's `--kv-cache-dtype fp8_e4m3` / `fp8_e5m2`): a cache in one of
# these holds `x / scale` saturated to the format's range; kernels dequantize as `q * scale`.
FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
KV_CACHE_DTYPES: tuple[torch.dtype, ...] = FLOAT_DTYPES + FP8_DTYPES

_TL_DTYPES: dict[torch.dtype, tl.dtype] = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` runs in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(kernel, InterpretedFunction)


def check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """Require a tensor of rank `ndim` whose dtype is one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {t.dtype}")
    return t


def check_contiguous(name: str, t: torch.Tensor) -> None:
    """Require a contiguous tensor (caches, tables: the kernels compute their own offsets)."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")


def check_rows_contiguous(name: str, t: torch.Tensor) -> None:
    """Require unit stride on the last (head_dim) axis; other strides are passed to the kernel.

    Query/key/value often arrive as views of a fused QKV projection, so only the innermost
    axis must be dense.
    """
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 on its last dimension, got strides {t.stride()}")


def check_same_dtype(expected: torch.dtype, **tensors: torch.Tensor) -> None:
    """Require every tensor in `tensors` to have dtype `expected`."""
    for name, t in tensors.items():
        if t.dtype != expected:
            raise ValueError(f"{name} has dtype {t.dtype} but must match {expected}")


def check_kv_cache_dtype(compute_dtype: torch.dtype, k_scale: float, v_scale: float, **caches: torch.Tensor) -> bool:
    """Require caches in `compute_dtype` (unquantized) or all in one FP8 format; return
    whether they are FP8. Scales must be positive and finite (they divide on store)."""
    first = next(iter(caches.values()))
    quantized = first.dtype in FP8_DTYPES
    check_same_dtype(first.dtype if quantized else compute_dtype, **caches)
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (isinstance(scale, float) and 0.0 < scale < float("inf")):
            raise ValueError(f"{name} must be a positive finite float, got {scale!r}")
    return quantized


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of a cache dtype: the saturation bound of a quantizing store."""
    return float(torch.finfo(dtype).max)


def check_shape(name: str, t: torch.Tensor, expected: Iterable[int]) -> None:
    """Require `t.shape == expected`."""
    shape = tuple(expected)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_device(kernel: object, **tensors: torch.Tensor) -> torch.device:
    """Require all tensors on one device that `kernel` can run on; return that device."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    device = first.device
    if is_interpreted(kernel):
        if device.type != "cpu":
            raise ValueError(
                f"{first_name} is on {device}, but TRITON_INTERPRET=1 runs kernels in the Triton "
                "interpreter, which needs CPU tensors"
            )
    elif device.type != "cuda":
        raise ValueError(
            f"{first_name} is on {device}: Triton kernels need a CUDA device. Use the torch "
            "attention backend on CPU, or set TRITON_INTERPRET=1 before importing kernels"
        )
    return device


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type of a float torch dtype."""
    return _TL_DTYPES[dtype]


def head_dim_tile(head_dim: int) -> int:
    """Power-of-two tile covering `head_dim` (80 -> 128), at least 16 for `tl.dot`."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_upcast(kernel: object, dtype: torch.dtype) -> bool:
    """Whether `tl.dot` operands must be cast to float32 before the product.

    Only in the interpreter with bfloat16: it stores bfloat16 as uint16 and its `tl.dot`
    multiplies the raw bit patterns (triton-lang/triton#11584, "not supported yet"). The cast
    is exact and the GPU path (False) is unchanged: a bf16 MMA also accumulates in float32.
    """
    return is_interpreted(kernel) and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str | None:
    """`tl.dot` input precision: IEEE for float32 inputs (the tf32 default drops 13 mantissa
    bits); None (the backend's default) for 16-bit inputs, where it does not apply."""
    return "ieee" if dtype == torch.float32 else None
