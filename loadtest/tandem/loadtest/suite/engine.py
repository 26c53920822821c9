"""The engine against sequential transformers `generate`, on the same weights in one process.

Both sides run greedy with EOS disabled on the bench model, with the same torch thread count.
transformers runs its requests one after another (its `generate` has no continuous batching);
the engine runs `concurrency` requests at once. Goal: >= 5x at concurrency 32.
"""

from __future__ import annotations

import torch

from tandem.engine.engine import Engine
from tandem.loadtest.bench.engine import engine_tokens_per_s, transformers_tokens_per_s
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Figure, Section

GOAL = 5.0
PROMPT_LEN = 32
CONCURRENCIES = (1, 8, 32)


def run(ctx: BenchContext) -> Section:
    max_tokens = ctx.size(128, 16)
    engine = Engine.from_pretrained(ctx.model_dir)
    baseline = transformers_tokens_per_s(ctx.model_dir, ctx.size(4, 1), PROMPT_LEN, max_tokens)
    rows = [("path", "concurrency", "tokens/s", "ratio to transformers")]
    rows.append(("transformers generate, sequential", "1", f"{baseline:.1f}", "1.00"))
    figures = []
    for concurrency in CONCURRENCIES:
        tps = engine_tokens_per_s(engine, concurrency, PROMPT_LEN, max_tokens)
        rows.append(("engine", str(concurrency), f"{tps:.1f}", f"{tps / baseline:.2f}"))
        figures.append(
            Figure(
                f"engine / transformers at concurrency {concurrency}",
                tps / baseline,
                goal=GOAL if concurrency == 32 else None,
            )
        )
    setup = (
        f"{PROMPT_LEN}-token random prompts, {max_tokens} new tokens each, greedy, ignore EOS; "
        f"both sides use {torch.get_num_threads()} torch threads."
    )
    return Section("engine", "Engine vs transformers generate", setup, tuple(figures), tuple(rows))
