"""The `draft_model` proposer: a smaller causal LM drafts tokens over its own paged KV.

Lifecycle of one request (the step contract of `proposer.py`):
1. First `propose` (or the first after `rollback(..., 0)`): the draft has no KV for it, so its
   first pass is a prefill of the draft over the whole context (prompt and generated tokens).
2. Each `propose` runs k passes of the draft over the batch: the first catches up the context
   the draft has not seen (at least the last sampled token), each later one feeds the token
   the previous pass drafted. After it, the draft's KV is valid for positions
   `< seq.num_tokens + k - 1` (the k-th draft token is never fed back).
3. `rollback(request_id, n)`: the target's KV is valid for `< n` only, so the tokens at `>= n`
   may have changed; the draft's valid count drops to `min(its count, n)`.
4. `finish(request_id)`: forget the count. The blocks are the batcher's; nothing to free.

P/D choice: the decode worker computes the draft's prompt KV itself (step 1) rather than
receiving it with the hand-off. The hand-off stays one KV stream of the target's layout, the
prefill worker need not load the draft nor know its layout (so the layout fingerprint stays
the target's), and the draft is at least 4x cheaper per token than the target, so its prefill
of a prompt costs at most a quarter of the target's prefill, paid once per request.

KV: one tensor per draft layer, `[2, num_blocks, block_size, draft_kv_heads, draft_head_dim]`
in the target's dtype, addressed by the TARGET's block ids and slots (one block table for
both). The draft writes only slots of positions `< seq.num_tokens + k - 1`, which the batcher
allocated before `propose`. Memory: `context.num_blocks` blocks of the draft's spec, i.e.
`kv_cache_bytes = num_blocks * draft_bytes_per_block`; as a share of the target's KV it is
(draft layers * KV heads * head dim) / (target's), extra memory the engine must budget for.
Blocks shared through the prefix cache hold the same tokens at the same positions, so two
requests writing draft KV there write the same values (up to float rounding of the batch).

Sampling: greedy requests draft the argmax. Sampled requests draft from the processed
distribution of the draft's logits (temperature, top-k, top-p, exactly `sampler.processed_probs`,
as vLLM applies them to both draft and target), normalised, returned in `Draft.probs`. A seeded
request draws with a generator keyed by (seed, position, `DRAFT_STREAM_TAG`), a stream apart
from the target's (seed, position) one, so the draft's choice and the target's acceptance
draws are independent and neither depends on the batch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence as Seq
from dataclasses import replace
from pathlib import Path

import torch
import xxhash

from tandem.common.request import SamplingParams
from tandem.engine.attention import AttentionBackend
from tandem.engine.batch_inputs import QueryChunk, build_batch_inputs
from tandem.engine.kv_cache import KVCacheSpec
from tandem.engine.loader import load_model
from tandem.engine.model_config import ModelConfig
from tandem.engine.models import LlamaForCausalLM
from tandem.engine.sampler import processed_probs, race
from tandem.engine.sequence import Sequence
from tandem.engine.spec.config import SpeculativeConfig
from tandem.engine.spec.draft_vocab import check_draft_compatible
from tandem.engine.spec.proposer import Draft, ProposerContext

DRAFT_STREAM_TAG = 0x6472616674  # "draft": mixed into the key of a seeded request's draws


def draft_generator(seed: int, position: int) -> torch.Generator:
    """The draft's CPU generator for a seeded request's token at `position`."""
    key = xxhash.xxh64_intdigest(struct.pack("<qqq", seed, position, DRAFT_STREAM_TAG)) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(key)


def create_draft_model_proposer(config: SpeculativeConfig, context: ProposerContext) -> DraftModelProposer:
    """Load the draft from `config.model` in the target's dtype on the target's device.
    Raises ValueError if it cannot draft for the target (vocabulary, EOS ids, tokenizer,
    maximum length: `check_draft_compatible`)."""
    assert config.model is not None  # SpeculativeConfig requires it for draft_model
    draft_dir = Path(config.model)
    dtype_name = str(context.dtype).removeprefix("torch.")
    draft_config = replace(ModelConfig.from_dir(draft_dir), dtype_name=dtype_name)
    check_draft_compatible(draft_dir, draft_config, context)
    model, _plan = load_model(draft_dir, draft_config, context.device, context.max_model_len)
    return DraftModelProposer(model, context)


class DraftModelProposer:
    """Owned by the engine; called from its step loop only (not thread-safe). Mutates only
    its KV cache tensors and its per-request valid counts; never a sequence."""

    name = "draft_model"

    def __init__(self, model: LlamaForCausalLM, context: ProposerContext) -> None:
        self.model = model
        self.backend: AttentionBackend = context.backend
        self.device = context.device
        self.block_size = context.block_size
        self.max_model_len = context.max_model_len
        self.kv_spec = KVCacheSpec(
            num_layers=model.config.num_layers,
            num_kv_heads=model.config.num_kv_heads,
            head_dim=model.config.head_dim,
            block_size=context.block_size,
            dtype=context.dtype,
        )
        self.kv_cache_bytes = context.num_blocks * self.kv_spec.bytes_per_block
        self.kv_caches = self.kv_spec.allocate(context.num_blocks, context.device)
        self._generator = torch.Generator().manual_seed(context.seed ^ DRAFT_STREAM_TAG)
        self._num_valid: dict[str, int] = {}  # request id -> positions whose draft KV is valid

    def num_valid_tokens(self, request_id: str) -> int:
        """Positions of `request_id` whose draft KV is valid (0 for an unknown request)."""
        return self._num_valid.get(request_id, 0)

    @torch.inference_mode()
    def propose(self, seqs: Seq[Sequence], num_tokens: Seq[int]) -> list[Draft]:
        # a drafted token's position stays below the context limit
        num_tokens = [max(0, min(k, self.max_model_len - s.num_tokens)) for s, k in zip(seqs, num_tokens)]
        drafted: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for i, k in enumerate(num_tokens) if k > 0]
        # pass 0 catches up each context from the draft's valid count (>= the last sampled token)
        chunks = []
        for i in active:
            seq = seqs[i]
            start = min(self._num_valid.get(seq.request_id, 0), seq.num_tokens - 1)
            chunks.append(QueryChunk(seq.token_ids[start:], start, seq.block_table))
        for step in range(max((num_tokens[i] for i in active), default=0)):
            if step > 0:
                active = [i for i in active if num_tokens[i] > step]
                chunks = [
                    QueryChunk([drafted[i][-1]], seqs[i].num_tokens + step - 1, seqs[i].block_table) for i in active
                ]
            logits = self._last_logits(chunks)  # float32 [len(active), vocab], on the CPU
            for row, i in enumerate(active):
                position = seqs[i].num_tokens + step  # of the token this row drafts
                token, dist = self._choose(logits[row], seqs[i].sampling, position)
                drafted[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
        for i, seq in enumerate(seqs):
            if num_tokens[i] > 0:
                self._num_valid[seq.request_id] = seq.num_tokens + num_tokens[i] - 1
        return [Draft(tuple(tokens), torch.stack(rows) if rows else None) for tokens, rows in zip(drafted, probs)]

    def rollback(self, request_id: str, num_valid_tokens: int) -> None:
        if request_id in self._num_valid:
            self._num_valid[request_id] = min(self._num_valid[request_id], num_valid_tokens)

    def finish(self, request_id: str) -> None:
        self._num_valid.pop(request_id, None)

    def _last_logits(self, chunks: Seq[QueryChunk]) -> torch.Tensor:
        batch = build_batch_inputs(chunks, self.block_size, self.device)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, self.backend)
        return self.model.compute_logits(hidden[batch.last_rows]).cpu()

    def _choose(self, logits: torch.Tensor, p: SamplingParams, position: int) -> tuple[int, torch.Tensor | None]:
        """The drafted token and, for a sampled request, the normalised distribution `[vocab]`
        it was drawn from."""
        if p.is_greedy:
            return int(logits.argmax()), None
        dist = processed_probs(logits, p)
        dist = dist / dist.sum()
        generator = draft_generator(p.seed, position) if p.seed is not None else self._generator
        return race(dist, generator), dist
