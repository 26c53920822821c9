"""Runs one step's plan through the model: builds the flat batch, returns logits.

Owner: the engine's step loop. It reads sequences (token ids, block tables, counters) but
mutates nothing except the KV cache tensors, which the attention backend writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.engine.attention import AttentionBackend
from tandem.engine.batch_inputs import QueryChunk, build_batch_inputs
from tandem.engine.models import LlamaForCausalLM
from tandem.engine.step_plan import StepPlan


@dataclass(frozen=True)
class StepResult:
    sample_logits: torch.Tensor  # float32 [num_sampling_chunks without a draft, vocab], in plan order
    prompt_logits: dict[str, torch.Tensor]  # request id -> float32 [rows, vocab] for this step
    # speculative decoding: request id -> float32 [1 + len(draft), vocab], the rows of its
    # last uncomputed token and of each draft (row i predicts the token at draft position i)
    verify_logits: dict[str, torch.Tensor]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        block_size: int,
        device: torch.device,
        kv_scales: Sequence[tuple[float, float]] | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.kv_scales = kv_scales  # per layer (k_scale, v_scale) of an FP8 cache; None: unquantized
        self.backend = backend
        self.block_size = block_size
        self.device = device

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        chunks = [
            QueryChunk(
                # a draft chunk ends with the drafts, after all of token_ids
                [*c.seq.token_ids[c.seq.num_computed_tokens : c.seq.num_computed_tokens + c.num_tokens]]
                + ([*c.draft.token_ids] if c.draft is not None else []),
                c.seq.num_computed_tokens,
                c.seq.block_table,
            )
            for c in plan.chunks
        ]
        batch = build_batch_inputs(chunks, self.block_size, self.device)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta, self.backend, self.kv_scales)
        starts = batch.query_starts
        # one logits projection (and one copy to the host) for the sampled rows and every
        # draft chunk's rows, split afterwards
        rows = [starts[i + 1] - 1 for i, c in enumerate(plan.chunks) if c.samples and c.draft is None]
        num_sample_rows = len(rows)
        verify_rows: list[tuple[str, int]] = []  # (request id, first row in `logits`)
        for i, chunk in enumerate(plan.chunks):
            if chunk.draft is not None:
                verify_rows.append((chunk.seq.request_id, len(rows)))
                rows.extend(range(starts[i + 1] - 1 - len(chunk.draft.token_ids), starts[i + 1]))
        logits = self.model.compute_logits(hidden[rows]).cpu()
        sample_logits = logits[:num_sample_rows]
        ends = [first for _, first in verify_rows[1:]] + [len(rows)]
        verify_logits = {request_id: logits[first:end] for (request_id, first), end in zip(verify_rows, ends)}
        prompt_logits: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(plan.chunks):
            seq = chunk.seq
            num_prompt_rows = min(seq.num_prompt_tokens - seq.num_computed_tokens, chunk.num_tokens)
            if seq.sampling.needs_prompt_logits and num_prompt_rows > 0:
                rows = hidden[starts[i] : starts[i] + num_prompt_rows]
                prompt_logits[seq.request_id] = self.model.compute_logits(rows).cpu()
        return StepResult(sample_logits, prompt_logits, verify_logits)
