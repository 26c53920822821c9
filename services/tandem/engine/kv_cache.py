"""The paged KV cache tensors of one worker (DESIGN.md section 4 layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the cache: one `[2, num_blocks, block_size, num_kv_heads, head_dim]` tensor
    per layer (K at index 0, V at index 1), in the model's dtype."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies across all layers, K and V."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element_size

    def num_blocks_for_bytes(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_block

    def allocate(self, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]
