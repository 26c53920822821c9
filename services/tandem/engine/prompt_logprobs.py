"""Prompt logprobs: each prompt token's logprob under the model, from the prompt's logits.

Who calls it: the engine's step (`keep_prompt_logits`, which also keeps the raw logits of a
request with `return_prompt_logits`), for a sequence with `prompt_logprobs` set, on every chunk
of its prompt (the batcher computes such a prompt in full, never from the prefix cache, so the
answer is the same whether or not an identical prompt ran before: the cached part is
recomputed, as vLLM does). Logits row j of a chunk that starts at position s is the model's
prediction at position s + j, which scores prompt token s + j + 1; the prompt's last row
predicts the first generated token and is not a prompt logprob. Values are the raw
log-softmax in float32 (no sampling controls, no temperature), as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from tandem.common.request import TokenLogprob
from tandem.engine.sequence import Sequence


def chunk_prompt_logprobs(
    logits: torch.Tensor,  # float32 [rows, vocab]: positions start .. start + rows - 1
    prompt_token_ids: Seq[int],
    start: int,
    num_top: int,
) -> list[tuple[TokenLogprob, int]]:
    """(logprob with the top `num_top` alternatives, rank) of prompt tokens start+1 .. for the
    rows of one chunk; rank 1 is the most likely token."""
    num_rows = min(logits.shape[0], len(prompt_token_ids) - 1 - start)
    if num_rows <= 0:
        return []
    log_probs = torch.log_softmax(logits[:num_rows].float(), dim=-1)  # [num_rows, vocab]
    targets = torch.tensor(prompt_token_ids[start + 1 : start + 1 + num_rows], dtype=torch.int64)
    chosen = log_probs.gather(1, targets[:, None])  # [num_rows, 1]
    ranks = ((log_probs > chosen).sum(dim=1) + 1).tolist()
    values = chosen[:, 0].tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * num_rows
    if num_top:
        top_values, top_ids = log_probs.topk(num_top, dim=-1)
        tops = [tuple(zip(ids, vals)) for ids, vals in zip(top_ids.tolist(), top_values.tolist())]
    return [(TokenLogprob(int(t), v, top), int(r)) for t, v, top, r in zip(targets.tolist(), values, tops, ranks)]


def keep_prompt_logits(seq: Sequence, logits: torch.Tensor) -> None:
    """Keep a prompt chunk's logits (`return_prompt_logits`) or its prompt logprobs. The
    chunk starts at `seq.num_computed_tokens` (the step's results are not applied yet); a
    prompt recomputed from position 0 (after a preemption) starts its logprobs over."""
    p = seq.sampling
    if p.return_prompt_logits:
        seq.prompt_logits.append(logits)
    if p.prompt_logprobs is not None:
        start = seq.num_computed_tokens
        if start == 0:
            seq.prompt_logprobs.clear()
        if start == len(seq.prompt_logprobs):  # contiguous from the prompt's start
            seq.prompt_logprobs.extend(chunk_prompt_logprobs(logits, seq.prompt_token_ids, start, p.prompt_logprobs))
