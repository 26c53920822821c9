"""Attention backends: write a step's new K/V into the paged cache, then attend over it.

The model runner builds one `AttentionMetadata` per step and every attention layer calls
`backend.forward(...)` with it. A backend owns no state; the KV cache tensor belongs to the
engine's `KVCache` and is mutated in place (only the slots in `slot_mapping`).

KV layout (DESIGN.md section 4): one tensor per layer,
`[2, num_blocks, block_size, num_kv_heads, head_dim]`, K at index 0 and V at index 1.

Backends are registered by name; `auto` picks `triton` on CUDA and `torch` elsewhere.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from tandem.engine.config import ATTENTION_BACKENDS, BACKEND_NAMES


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step description of a flattened batch of variable-length query chunks.

    Sequence `i` contributes `query_lens[i]` new tokens (rows
    `query_start_loc[i]:query_start_loc[i+1]` of the flattened batch). They are the last
    tokens of its `seq_lens[i]`-long context, so their positions are
    `seq_lens[i] - query_lens[i] ... seq_lens[i] - 1`.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]; slot = block_id * block_size + offset
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]; context length including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]; padded with 0
    query_lens: tuple[int, ...]  # host copy, one per sequence
    seq_lens_host: tuple[int, ...]  # host copy of seq_lens
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence has exactly one new token (a pure decode step)."""
        return all(n == 1 for n in self.query_lens)

    @functools.cached_property
    def length_buckets(self) -> tuple[tuple[int, ...], ...]:
        """Sequence indices grouped by similar context length, longest group first (computed
        once per step, used by every layer). See `length_buckets`."""
        return length_buckets(self.seq_lens_host)

    @functools.cached_property
    def bucket_tensors(self) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], ...]:
        """Per length bucket: (row indices, their block tables, their seq_lens, longest
        context), gathered once per step rather than once per layer."""
        out = []
        for rows in self.length_buckets:
            index = torch.tensor(rows, dtype=torch.long, device=self.seq_lens.device)
            out.append(
                (index, self.block_tables[index], self.seq_lens[index], max(self.seq_lens_host[i] for i in rows))
            )
        return tuple(out)


# A padded batch wastes (max_len - len) gathered tokens per sequence. Splitting it costs one
# more gather + attention call per layer, worth about this many tokens of padding on a CPU.
BUCKET_SPLIT_PADDING_TOKENS = 2048


def length_buckets(seq_lens: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Group sequence indices for padded batched attention so that one long context does not
    make every short one gather (and attend over) its length.

    Walk the sequences from longest to shortest; the current group's length is its first
    (longest) member's. The next sequence, of length s, starts a new group when the group
    length is more than twice s and keeping it would pad s and every shorter sequence by more
    than `BUCKET_SPLIT_PADDING_TOKENS` in total. Indices within a group are ascending.
    """
    order = sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i))
    groups: list[list[int]] = []
    group_len = 0
    for rank, i in enumerate(order):
        s = seq_lens[i]
        remaining = len(order) - rank
        if not groups or (group_len > 2 * s and (group_len - s) * remaining > BUCKET_SPLIT_PADDING_TOKENS):
            groups.append([])
            group_len = s
        groups[-1].append(i)
    return tuple(tuple(sorted(g)) for g in groups)


class AttentionBackend(Protocol):
    """Contract for an attention implementation.

    Called by every attention layer once per step, from the worker's step-loop thread only.
    `forward` first stores `key`/`value` into `kv_cache` at `meta.slot_mapping` (mutating the
    cache in place), then returns causal attention of `query` over each sequence's whole
    context read back from the paged cache. An FP8 `kv_cache` (float8_e4m3fn/e5m2) stores
    `x / scale` and is read as `fp8 * scale` with the layer's `kv_scale` = (k_scale, v_scale),
    which other dtypes ignore (tandem.engine.kv_cache states the scale rule).
    """

    name: str

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        kv_scale: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def resolve_backend_name(name: str, device: torch.device) -> str:
    """Map `auto` to a concrete backend for `device`; reject unknown names."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKEND_NAMES}")
    return name


def create_backend(name: str, device: torch.device) -> AttentionBackend:
    """Instantiate the backend registered under `name` (after resolving `auto`)."""
    module_name, _, class_name = ATTENTION_BACKENDS[resolve_backend_name(name, device)].partition(":")
    factory: Callable[[], AttentionBackend] = getattr(importlib.import_module(module_name), class_name)
    return factory()
