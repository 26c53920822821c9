"""transformers as the exactness oracle: greedy generate and full-prompt logits, batch size 1."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=4)
def load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@torch.no_grad()
def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation (stops at the model's EOS, which it includes, like the engine)."""
    model = load_hf(path)
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def hf_prompt_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    return load_hf(path)(torch.tensor([prompt])).logits[0].float()
