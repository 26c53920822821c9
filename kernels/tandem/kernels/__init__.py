"""Triton kernels of Tandem: cache write, paged decode and prefill attention, block pack/unpack.

Each family lives in its own module with its `@triton.jit` kernels and a typed launcher that
validates arguments (`ValueError` naming the argument) and computes the grid:

- `store_kv`                  (tandem.kernels.cache_write)          write new K/V into their slots
- `paged_decode_attention`    (tandem.kernels.decode_attention)   one new token per sequence
- `paged_prefill_attention`   (tandem.kernels.prefill_attention)  variable-length causal chunks
- `pack_blocks`, `unpack_blocks` (tandem.kernels.block_copy)      KV blocks <-> one flat buffer

`tandem.kernels.reference` holds the plain torch versions (ground truth, CPU path). The bandwidth
benchmark behind `tandem bench kernels` is `tandem.loadtest.bench.kernels`.

Launchers are imported lazily (PEP 562): `import tandem.kernels.reference` must not import Triton,
because `triton.jit` decides between compiled and interpreted kernels (TRITON_INTERPRET=1)
when a kernel module is first imported. Importing the reference on the CPU path therefore
cannot fix that choice too early.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.kernels.block_copy import pack_blocks as pack_blocks
    from tandem.kernels.block_copy import unpack_blocks as unpack_blocks
    from tandem.kernels.cache_write import store_kv as store_kv
    from tandem.kernels.decode_attention import paged_decode_attention as paged_decode_attention
    from tandem.kernels.prefill_attention import paged_prefill_attention as paged_prefill_attention

_LAUNCHER_MODULES: dict[str, str] = {
    "store_kv": "tandem.kernels.cache_write",
    "paged_decode_attention": "tandem.kernels.decode_attention",
    "paged_prefill_attention": "tandem.kernels.prefill_attention",
    "pack_blocks": "tandem.kernels.block_copy",
    "unpack_blocks": "tandem.kernels.block_copy",
}

__all__ = list(_LAUNCHER_MODULES)


def __getattr__(name: str) -> Any:
    module = _LAUNCHER_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
