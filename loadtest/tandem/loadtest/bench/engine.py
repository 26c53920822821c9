"""`tandem bench engine`: decode tokens/s of the engine at concurrency 1, 8 and 32, beside
transformers `generate` run sequentially on the same weights in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from tandem.common.request import SamplingParams
from tandem.engine.engine import Engine

CONCURRENCIES = (1, 8, 32)


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def engine_tokens_per_s(engine: Engine, concurrency: int, prompt_len: int, max_tokens: int) -> float:
    prompts = _prompts(concurrency, prompt_len, engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outputs) / elapsed


def transformers_tokens_per_s(model_dir: Path, num_requests: int, prompt_len: int, max_tokens: int) -> float:
    """Sequential `generate` calls, one request at a time, greedy, EOS disabled."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    model.generation_config.eos_token_id = None
    prompts = _prompts(num_requests, prompt_len, model.config.vocab_size)
    total = 0
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
            total += out.shape[1] - len(prompt)
        elapsed = time.perf_counter() - start
    return total / elapsed


def run_engine_bench(
    model_dir: Path, prompt_len: int = 32, max_tokens: int = 128, out: Callable[[str], None] = print
) -> int:
    engine = Engine.from_pretrained(model_dir)
    try:
        baseline = transformers_tokens_per_s(engine.model_dir, 4, prompt_len, max_tokens)
    except ImportError:
        out("transformers is not installed (pip install -e '.[dev]'); it is the baseline of this benchmark")
        return 1
    out(f"model: {engine.model_dir}  prompt {prompt_len} tokens, {max_tokens} new tokens, greedy")
    out(f"transformers generate (sequential): {baseline:9.1f} tokens/s")
    out(f"{'concurrency':>11}  {'engine tokens/s':>15}  {'ratio':>6}")
    for concurrency in CONCURRENCIES:
        tps = engine_tokens_per_s(engine, concurrency, prompt_len, max_tokens)
        out(f"{concurrency:>11}  {tps:>15.1f}  {tps / baseline:>5.2f}x")
    return 0
