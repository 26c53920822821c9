"""`tandem bench guardrails`: the gateway's delta path with and without guardrail hooks.

What is timed: `Generation.events()` draining `choices` concurrent choices of `tokens` tokens
each, one token per delta, from an in-process pipeline that yields precomputed deltas (no
workers, no HTTP): per delta the gateway detokenizes, cuts stop strings, runs the output
window when output hooks are configured, and queues the event. The variants run side by side,
alternating in each round so that all see the same machine; the median round of each is
reported as deltas/s, and as a ratio to the variant without hooks:
- `none`: no `--guardrails` (no window is made; the path does one `is None` test per delta);
- `regex_redactor`: the default e-mail and card patterns, window 64;
- `regex_redactor+blocklist`: both built-ins, window 64.
Each variant's text is checked: unchanged without hooks, every address redacted with them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from tandem.common.request import FinishReason, Request, SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.generation import ChoiceSpec, Generation, StreamLimits
from tandem.gateway.guardrails import Guardrails, load_guardrails
from tandem.gateway.guardrails.redactor import RegexRedactor
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.pipeline import Delta

SENTENCE = "Please write to ann.lee@example.org about the plan for the new bridge over the river. "
VARIANTS = {
    "none": "",
    "regex_redactor": "regex_redactor",
    "regex_redactor+blocklist": 'regex_redactor,blocklist:{"words": ["forbidden", "classified"]}',
}
WINDOW_CHARS = 64


class _Replay:
    """A pipeline that yields `token_ids` one per delta (the last one finishes the choice)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    async def generate(self, request: Request, parent: object = None, session: object = None) -> AsyncIterator[Delta]:
        last = len(self.token_ids) - 1
        for i, token in enumerate(self.token_ids):
            yield Delta((token,), (), FinishReason.LENGTH if i == last else None)


async def _drain(
    tokenizer: Tokenizer, token_ids: list[int], choices: int, guardrails: Guardrails
) -> tuple[float, dict[int, str]]:
    """(seconds, text per choice) of one request with `choices` choices."""
    specs = [ChoiceSpec(i, (5, 6), SamplingParams(max_tokens=len(token_ids))) for i in range(choices)]
    generation = Generation(
        _Replay(token_ids),  # type: ignore[arg-type]
        tokenizer,
        GatewayMetrics("bench"),
        "cmpl-bench",
        specs,
        (),
        None,
        None,
        limits=StreamLimits(max_buffered_events=choices * len(token_ids) + 1),
        guardrails=guardrails,
    )
    texts: dict[int, list[str]] = {i: [] for i in range(choices)}
    start = time.perf_counter()
    async for event in generation.events():
        texts[event.index].append(event.text)
    return time.perf_counter() - start, {i: "".join(parts) for i, parts in texts.items()}


def run_guardrails_bench(
    model_dir: Path, tokens: int = 512, choices: int = 8, rounds: int = 7, out: Callable[[str], None] = print
) -> dict[str, float]:
    """Print a table of deltas/s per variant and its ratio to `none`; return the ratios."""
    tokenizer = Tokenizer.from_pretrained(model_dir)
    source = SENTENCE * (tokens // 8 + 1)
    token_ids = tokenizer.encode(source, add_special_tokens=False)[:tokens]
    plain = tokenizer.decode(token_ids)
    variants = {name: load_guardrails(spec, WINDOW_CHARS) for name, spec in VARIANTS.items()}
    redactor = RegexRedactor({})
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, guardrails in variants.items():
            elapsed, texts = asyncio.run(_drain(tokenizer, token_ids, choices, guardrails))
            expected = plain if name == "none" else redactor.redact(plain)
            if any(text != expected for text in texts.values()):
                raise RuntimeError(f"variant {name}: the output text is not what its hooks should make of it")
            seconds[name].append(elapsed)
    deltas = tokens * choices
    rate = {name: deltas / statistics.median(s) for name, s in seconds.items()}
    ratios = {name: rate[name] / rate["none"] for name in rate}
    out(f"guardrails bench: {choices} choices x {tokens} tokens, one token per delta, median of {rounds} rounds")
    out(f"{'variant':<26} {'deltas/s':>10} {'us/delta':>9} {'vs none':>8}")
    for name in variants:
        out(f"{name:<26} {rate[name]:>10.0f} {1e6 / rate[name]:>9.1f} {ratios[name]:>8.2f}")
    return ratios
