"""Every kernel variant the launchers launch compiles to a CUDA binary, GPU or not.

The interpreter executes kernels as numpy code: it never checks what the compiler checks
(loop-carried types, `tl.dot` minimum sizes, pointer casts, register and shared memory
limits). So this test runs the real launchers in a subprocess with TRITON_INTERPRET unset,
swaps each `@triton.jit` kernel for a recorder that turns the launch arguments into a
signature, and compiles it with `triton.compile` for sm_80 and sm_90 down to a cubin (Triton
ships ptxas; no GPU or driver is needed). Launch-time specialisation (ints equal to 1 or
divisible by 16) is not reproduced: the compiled variant is the general one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

_TARGETS = (("cuda", 80, 32), ("cuda", 90, 32))
_TYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


class _CompileOnly:
    """Stands in for a JITFunction: `kernel[grid](*args)` compiles instead of launching."""

    def __init__(self, kernel: Any, log: list[str]) -> None:
        self.kernel = kernel
        self.log = log

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return self._compile

    def _compile(self, *args: Any, **kwargs: Any) -> None:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        bound = dict(zip(self.kernel.arg_names, args)) | kwargs
        signature: dict[str, str] = {}
        constexprs: dict[tuple[int, ...], Any] = {}
        for i, param in enumerate(self.kernel.params):
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[(i,)] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _TYPE_NAMES[value.dtype]
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                signature[param.name] = "i64" if abs(int(value)) >= 2**31 else "i32"
        for target in _TARGETS:
            compiled = triton.compile(ASTSource(self.kernel, signature, constexprs), target=GPUTarget(*target))
            assert "cubin" in compiled.asm
            # 99 KiB: the shared memory per block of sm_86/sm_89 (A10, L4, RTX 30xx/40xx)
            assert compiled.metadata.shared <= 99 * 1024, (self.kernel.fn.__name__, target, compiled.metadata.shared)
        name = self.kernel.fn.__name__
        self.log.append(f"{name} {sorted((k, str(v)) for k, v in kwargs.items())}")


def _compile_all() -> None:
    """Run each launcher on CPU tensors with every kernel replaced by `_CompileOnly`."""
    from tandem.kernels import block_copy, cache_write, decode_attention, prefill_attention

    log: list[str] = []
    for module in (block_copy, cache_write, decode_attention, prefill_attention):
        module.check_device = lambda kernel, **tensors: next(iter(tensors.values())).device
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, _CompileOnly(getattr(module, name), log))

    cases = [  # (head_dim, block_size, num_heads, num_kv_heads, dtype)
        (128, 16, 32, 8, torch.float16),
        (80, 16, 8, 8, torch.bfloat16),
        (256, 32, 16, 2, torch.float32),
        (64, 16, 28, 4, torch.bfloat16),
    ]
    for head_dim, block_size, num_heads, num_kv_heads, dtype in cases:
        cache = torch.zeros((4, block_size, num_kv_heads, head_dim), dtype=dtype)
        tables = torch.zeros((2, 2), dtype=torch.int32)
        lens = torch.ones(2, dtype=torch.int32)
        query = torch.zeros((2, num_heads, head_dim), dtype=dtype)
        key = torch.zeros((2, num_kv_heads, head_dim), dtype=dtype)
        cache_write.store_kv(key, key, cache, cache, torch.zeros(2, dtype=torch.int64))
        for splits in (1, 4):
            decode_attention.paged_decode_attention(query, cache, cache, tables, lens, 0.1, num_splits=splits)
        loc = torch.tensor([0, 1, 2], dtype=torch.int32)
        prefill_attention.paged_prefill_attention(query, cache, cache, tables, loc, lens, 0.1)
    caches = [torch.zeros((4, 16, 8, 128), dtype=torch.float16)] * 2
    block_copy.unpack_blocks(block_copy.pack_blocks(caches, caches, [1]), caches, caches, [2])
    print("\n".join(log))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels for real")
def test_all_launched_kernels_compile_for_sm80_and_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, __file__], cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = result.stdout.splitlines()
    # 4 cases x (store + 2 decode + reduce + prefill) + pack + unpack
    assert len(compiled) == 4 * 5 + 2, result.stdout


if __name__ == "__main__":
    _compile_all()
