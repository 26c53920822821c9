"""Quantized serving, KV rows: an FP8 KV cache against the model's dtype (`make bench` section).

Measured in process on the bench model in bfloat16 (no servers, so the section stays short):
1. KV bytes per token, from the engines' cache specs.
2. Hand-off seconds of a 2000-token prompt: a prefill engine holds the prompt's blocks under a
   lease, and a decode engine's store pulls them over the gRPC transport on loopback (both in
   this process). bf16 and fp8 pulls take turns; median of 60 each after 3 warm-up rounds (one
   pull moves only 2-4 MiB in a few ms, so fewer pulls, or pulls of one dtype after the
   other, let the machine's load swing the ratio). Goal: fp8 / bf16 <= 0.55.
3. Maximum concurrent sequences at one KV budget: the pool's blocks / blocks of one
   512-token sequence. Goal: fp8 / bf16 >= 1.9.
4. Decode tokens/s at concurrency 32 (32 prompts of 64 tokens, 32 greedy tokens each).
5. Teacher-forced quality (`teacher_forced_quality`): the fp8 engine's greedy tokens scored by
   the unquantized engine. Goals from issue 18: argmax agreement >= 0.85, mean |logprob
   difference| of the chosen tokens <= 0.1.
6. Weights (`bench/quant_weights.py`): resident weight bytes of real compressed-tensors
   checkpoints of the bench model (FP8 W8A8, INT8 W8A16 per channel and per group) and of
   `--quantization fp8`, against bf16, with their teacher-forced quality against bf16.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.engine import Engine, SamplingParams
from tandem.loadtest.bench.kv_handoff import HANDOFF_WARMUP, handoff_seconds
from tandem.loadtest.bench.quant_weights import HEADERS, weight_rows
from tandem.loadtest.suite.context import BenchContext
from tandem.loadtest.suite.figures import Direction, Figure, Section

AGREEMENT_GOAL = 0.85
LOGPROB_ERROR_GOAL = 0.1
BYTES_RATIO_GOAL = 0.55
CONCURRENCY_GOAL = 1.9
HANDOFF_ROUNDS = 60  # pulls per KV dtype, after HANDOFF_WARMUP rounds


@dataclass(frozen=True)
class Quality:
    """Teacher-forced closeness of a quantized engine's greedy output to a reference engine."""

    num_tokens: int
    argmax_agreement: float  # fraction of positions where the reference's argmax is the token
    mean_abs_logprob_error: float  # mean |logprob_quantized - logprob_reference| of the tokens


def teacher_forced_quality(
    quantized: Engine, reference: Engine, prompts: Sequence[Sequence[int]], max_tokens: int
) -> Quality:
    """Generate greedily with `quantized` (keeping each token's logprob), then run prompt +
    generated tokens through `reference` with prompt logits, and compare at the generated
    positions. Free-running agreement would not measure closeness: random models diverge
    after the first differing token under any KV quantization."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    outputs = quantized.generate(prompts, sampling)
    scoring = SamplingParams(max_tokens=1, temperature=0.0, return_prompt_logits=True)
    rescored = reference.generate([list(o.prompt_token_ids) + list(o.token_ids) for o in outputs], scoring)
    agree, errors = 0, []
    for out, ref in zip(outputs, rescored):
        assert out.logprobs is not None and ref.prompt_logits is not None
        n = len(out.prompt_token_ids)
        rows = torch.log_softmax(ref.prompt_logits[n - 1 : n - 1 + len(out.token_ids)], dim=-1)
        for row, token, logprob in zip(rows, out.token_ids, out.logprobs):
            agree += int(int(row.argmax()) == token)
            errors.append(abs(logprob.logprob - float(row[token])))
    return Quality(len(errors), agree / len(errors), sum(errors) / len(errors))


def _engine(ctx: BenchContext, kv_cache_dtype: str, **options: object) -> Engine:
    return Engine.from_pretrained(
        ctx.model_dir, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, num_threads=1, **options
    )  # fmt: skip


def decode_tokens_per_s(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int) -> float:
    """Generated tokens per second over the steps after every prompt has its first token."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"decode-{i}", prompt, sampling)
    started_ids: set[str] = set()
    while len(started_ids) < len(prompts):
        started_ids.update(o.request_id for o in engine.step() if o.new_token_ids)
    tokens, started = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - started)


def run(ctx: BenchContext) -> Section:
    prompt_tokens, rounds = ctx.size(2000, 256), ctx.size(HANDOFF_ROUNDS, 3)  # 2000: the bench model's limit is 2048
    budget_bytes, seq_tokens = 64 << 20, 512
    concurrency, decode_tokens = ctx.size(32, 4), ctx.size(32, 4)
    engines = {name: _engine(ctx, kv, kv_cache_bytes=budget_bytes) for name, kv in (("bf16", "auto"), ("fp8", "fp8"))}
    vocab = engines["bf16"].model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, vocab, (prompt_tokens,), generator=gen).tolist()
    pairs = {name: (engine, _engine(ctx, engine.config.kv_cache_dtype)) for name, engine in engines.items()}
    handoffs = handoff_seconds(pairs, prompt, rounds, ctx.size(HANDOFF_WARMUP, 1))
    results: dict[str, dict[str, float]] = {}
    for name, engine in engines.items():
        handoff = handoffs[name]
        blocks_per_seq = -(-seq_tokens // engine.config.block_size)
        prompts = [torch.randint(4, vocab, (64,), generator=gen).tolist() for _ in range(concurrency)]
        results[name] = {
            "bytes_per_token": engine.kv_spec.bytes_per_token,
            "handoff_bytes": handoff.bytes_moved,
            "handoff_s": handoff.median,
            "handoff_p10_s": handoff.percentile(10),
            "handoff_p90_s": handoff.percentile(90),
            "num_blocks": engine.pool.num_blocks,
            "max_seqs": engine.pool.num_blocks // blocks_per_seq,
            "decode_tps": decode_tokens_per_s(engine, prompts, decode_tokens),
        }
    quality_lengths = (8, 24) if ctx.quick else (32, 96, 200, 400)
    quality_prompts = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in quality_lengths]
    quality = teacher_forced_quality(
        _engine(ctx, "fp8", num_blocks=512), _engine(ctx, "auto", num_blocks=512), quality_prompts, ctx.size(32, 4)
    )
    weights = weight_rows(
        ctx.model_dir, ctx.work_dir / "quantized", num_prompts=ctx.size(4, 1), new_tokens=ctx.size(32, 4)
    )
    bf16, fp8 = results["bf16"], results["fp8"]
    at_most = Direction.AT_MOST
    handoff_name = f"hand-off seconds of a {prompt_tokens}-token prompt, fp8 / bf16"
    figures: tuple[Figure, ...] = (
        Figure(
            "KV bytes per token, fp8 / bf16",
            fp8["bytes_per_token"] / bf16["bytes_per_token"],
            "x",
            BYTES_RATIO_GOAL,
            at_most,
        ),
        Figure(handoff_name, fp8["handoff_s"] / bf16["handoff_s"], "x", BYTES_RATIO_GOAL, at_most),
        Figure(
            "max concurrent sequences at one KV budget, fp8 / bf16",
            fp8["max_seqs"] / bf16["max_seqs"],
            "x",
            CONCURRENCY_GOAL,
        ),
        Figure(f"decode tokens/s at concurrency {concurrency}, fp8 / bf16", fp8["decode_tps"] / bf16["decode_tps"]),
        Figure("teacher-forced argmax agreement, fp8 vs bf16", quality.argmax_agreement, "", AGREEMENT_GOAL),
        Figure(
            "mean |logprob error| of the chosen tokens", quality.mean_abs_logprob_error, "", LOGPROB_ERROR_GOAL, at_most
        ),
    )
    figures += tuple(
        Figure(f"resident weight bytes, {w.name} / bf16", w.ratio_to_bf16, "x") for w in weights if w.name != "bf16"
    )
    rows = [
        (
            "KV cache",
            "bytes/token",
            "hand-off MiB",
            "hand-off ms (median)",
            "hand-off ms p10..p90",
            "blocks",
            "max seqs",
            "decode tok/s",
        )
    ]
    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r['bytes_per_token']:.0f}",
                f"{r['handoff_bytes'] / 2**20:.1f}",
                f"{r['handoff_s'] * 1e3:.2f}",
                f"{r['handoff_p10_s'] * 1e3:.2f}..{r['handoff_p90_s'] * 1e3:.2f}",
                f"{r['num_blocks']:.0f}",
                f"{r['max_seqs']:.0f}",
                f"{r['decode_tps']:.0f}",
            )
        )
    setup = (
        f"bench model in bfloat16, KV cache bf16 (auto) vs fp8 (e4m3, scales 1.0: the model has no "
        f"kv_cache_scheme), in process, one torch thread. Hand-off: {prompt_tokens}-token prompt prefilled on "
        f"one engine, its full blocks pulled under a lease into a second engine's blocks by the gRPC transport "
        f"on loopback (source servicers in the same process), median of {rounds} pulls each, bf16 and fp8 "
        f"taking turns pull by pull after {ctx.size(HANDOFF_WARMUP, 1)} warm-up rounds (spread: p10..p90 in the "
        f"table). KV budget "
        f"{budget_bytes >> 20} MiB, sequences of {seq_tokens} tokens. Decode: {concurrency} prompts of 64 tokens, "
        f"{decode_tokens} greedy tokens each, timed after every first token. Quality: {quality.num_tokens} "
        "fp8-generated tokens rescored by the bf16 engine."
    )
    cells = [HEADERS, *(w.cells() for w in weights)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    notes = tuple("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
    setup += (
        f" Weights: bench model checkpoints written with compressed-tensors, {ctx.size(4, 1)} prompts of 64 tokens "
        f"and {ctx.size(32, 4)} bf16-greedy tokens, teacher-forced against bf16 (table below)."
    )
    return Section(
        "quantization", "Quantized serving: FP8 KV cache and quantized weights", setup, figures, tuple(rows), notes
    )
