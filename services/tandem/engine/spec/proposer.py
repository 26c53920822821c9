"""The proposer interface: what drafts tokens for the target to verify.

A proposer is registered by name (`PROPOSERS`, the config's `method`) as "module:function";
the function takes `(SpeculativeConfig, ProposerContext)` and returns a `Proposer`. The engine
owns one proposer and calls it from its step loop only.

Step contract (the batcher plans proposals as part of the step):
1. `propose(seqs, num_tokens)`: for each running sequence whose tokens are all computed but
   the last sampled one, draft at most `num_tokens[i]` next tokens. When it is called,
   `seq.block_table` already has blocks for every position `< seq.num_tokens + num_tokens[i]`,
   and the target's KV is valid for positions `< seq.num_tokens - 1`. A proposer with its own
   KV (the draft model) keeps it in its own cache tensors at the same block ids and slots as
   the target's (one block table for both), so block allocation, preemption and freeing stay
   the batcher's alone. It never mutates `seq`.
2. The target verifies the drafts in its forward pass; some prefix of each is accepted.
3. `rollback(request_id, num_valid_tokens)`: the target's KV is valid for positions
   `< num_valid_tokens` only (after each verification, and with 0 after a preemption). A
   proposer drops whatever it computed beyond that.
4. `finish(request_id)`: the request is gone (finished, aborted, handed off); forget it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from tandem.engine.attention import AttentionBackend
    from tandem.engine.model_config import ModelConfig
    from tandem.engine.sequence import Sequence
    from tandem.engine.spec.config import SpeculativeConfig

PROPOSERS: dict[str, str] = {
    "ngram": "tandem.engine.spec.ngram:create_ngram_proposer",
    "draft_model": "tandem.engine.spec.draft_model:create_draft_model_proposer",
}


@dataclass(frozen=True)
class Draft:
    """Up to k proposed tokens for one sequence. `probs` is the distribution each was drawn
    from (float32 `[len(token_ids), vocab]`, after the request's temperature, top-k and top-p),
    or None for a deterministic proposer (n-gram: each is a point mass on its token)."""

    token_ids: tuple[int, ...]
    probs: torch.Tensor | None = None


@dataclass(frozen=True)
class ProposerContext:
    """What the engine gives a proposer at construction: the target's model config (a draft
    must share its vocabulary), the device and dtype, the KV block geometry (a draft's cache
    holds `num_blocks` blocks of `block_size` at the target's block ids), the attention
    backend, the context limit and the engine's seed. `target_dir`, the target's model
    directory, lets a draft compare tokenizer files (None: compared by config only)."""

    target_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    block_size: int
    num_blocks: int
    backend: AttentionBackend
    max_model_len: int
    seed: int
    target_dir: Path | None = None


class Proposer(Protocol):
    name: str

    def propose(self, seqs: Seq[Sequence], num_tokens: Seq[int]) -> list[Draft]: ...

    def rollback(self, request_id: str, num_valid_tokens: int) -> None: ...

    def finish(self, request_id: str) -> None: ...


def create_proposer(config: SpeculativeConfig, context: ProposerContext) -> Proposer:
    """Instantiate the proposer registered under `config.method`."""
    module_name, _, function_name = PROPOSERS[config.method].partition(":")
    factory: Callable[[SpeculativeConfig, ProposerContext], Proposer] = getattr(
        importlib.import_module(module_name), function_name
    )
    return factory(config, context)
