"""Quantized weights on the bench model: resident bytes and teacher-forced quality against bf16.

For the `quantization` bench section (which merges these rows into its tables). One call of
`weight_rows`:
1. writes compressed-tensors checkpoints of the bench model with the library itself
   (`tandem.engine.quant.writer`): FP8 W8A8 (FP8_DYNAMIC) and INT8 W8A16 per channel and
   per group of 128 columns; plus `--quantization fp8` at load of the unquantized model;
2. loads each, and the unquantized model, in bfloat16, and reads `Engine.weight_bytes`;
3. teacher-forced quality: the bf16 engine generates greedy continuations of fixed random
   prompts; every quantized engine is fed the same sequences (prompt + bf16 output) as a
   prompt, and at each position of the output we compare with bf16's logits: argmax agreement
   and the mean absolute difference of the log-probability of the token bf16 chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

LOAD_TIME_FP8 = "fp8 (load)"  # --quantization fp8 on the unquantized checkpoint


def checkpoints(group_size: int) -> dict[str, tuple[str, int | None]]:
    """Row name -> (preset, group size) for `write_compressed_checkpoint`."""
    return {
        "fp8 w8a8": ("FP8_DYNAMIC", None),
        "int8 w8a16 (channel)": ("W8A16", None),
        f"int8 w8a16 (group {group_size})": ("W8A16", group_size),
    }


@dataclass(frozen=True)
class WeightRow:
    """One model variant. The bf16 row has ratio 1 and no quality figures."""

    name: str
    weight_bytes: int
    ratio_to_bf16: float
    argmax_agreement: float | None  # 0..1 over all teacher-forced positions
    mean_abs_logprob_error: float | None  # nats

    def cells(self) -> tuple[str, ...]:
        """Preformatted cells: variant, MiB, ratio, agreement %, mean |logprob error|."""
        agreement = "-" if self.argmax_agreement is None else f"{100 * self.argmax_agreement:.1f}%"
        error = "-" if self.mean_abs_logprob_error is None else f"{self.mean_abs_logprob_error:.4f}"
        return (self.name, f"{self.weight_bytes / 2**20:.2f}", f"{self.ratio_to_bf16:.3f}", agreement, error)


HEADERS = ("weights", "resident MiB", "vs bf16", "argmax agreement", "mean |logprob error|")


def weight_rows(
    model_dir: Path,
    work: Path,
    num_prompts: int = 8,
    prompt_len: int = 64,
    new_tokens: int = 64,
    device: str = "cpu",
    group_size: int = 128,
) -> list[WeightRow]:
    """Rows for bf16, each compressed-tensors checkpoint and load-time fp8 of `model_dir`;
    checkpoints are written under `work`. `group_size` must divide the linear layers' inputs."""
    from tandem.engine import Engine, SamplingParams
    from tandem.engine.quant.writer import write_compressed_checkpoint

    options: dict[str, object] = {"dtype": "bfloat16", "device": device, "num_blocks": 256}
    reference = Engine.from_pretrained(model_dir, **options)
    generator = torch.Generator().manual_seed(0)
    vocab = reference.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=generator).tolist() for _ in range(num_prompts)]
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sequences = [p + list(o.token_ids) for p, o in zip(prompts, reference.generate(prompts, greedy))]
    ref_logits = _prompt_logits(reference, sequences)
    rows = [WeightRow("bf16", reference.weight_bytes, 1.0, None, None)]
    variants: list[tuple[str, Path, dict[str, object]]] = []
    for name, (preset, group) in checkpoints(group_size).items():
        target = work / f"{model_dir.name}-{preset.lower()}-{group or 'channel'}"
        if not target.is_dir():
            write_compressed_checkpoint(model_dir, target, preset, group)
        variants.append((name, target, options))
    variants.append((LOAD_TIME_FP8, model_dir, {**options, "quantization": "fp8"}))
    for name, path, engine_options in variants:
        engine = Engine.from_pretrained(path, **engine_options)
        agreement, error = teacher_forced_quality(ref_logits, _prompt_logits(engine, sequences), prompt_len)
        rows.append(
            WeightRow(name, engine.weight_bytes, engine.weight_bytes / reference.weight_bytes, agreement, error)
        )
    return rows


def _prompt_logits(engine: object, sequences: list[list[int]]) -> list[torch.Tensor]:
    from tandem.engine import Engine, SamplingParams

    assert isinstance(engine, Engine)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, return_prompt_logits=True)
    outputs = engine.generate(sequences, params)
    logits = [o.prompt_logits for o in outputs]
    assert all(x is not None for x in logits)
    return [x.float().cpu() for x in logits if x is not None]


def teacher_forced_quality(
    reference: list[torch.Tensor], candidate: list[torch.Tensor], prompt_len: int
) -> tuple[float, float]:
    """(argmax agreement, mean |logprob error|) over the positions that predict the output
    tokens: row t of a sequence's logits predicts token t + 1, so rows prompt_len - 1 .. end - 1.
    The chosen token is the reference's argmax (its greedy output)."""
    agree = total = 0
    error_sum = 0.0
    for ref, cand in zip(reference, candidate):
        ref_rows, cand_rows = ref[prompt_len - 1 : -1], cand[prompt_len - 1 : -1]  # [new_tokens, vocab]
        chosen = ref_rows.argmax(dim=-1)
        agree += int((cand_rows.argmax(dim=-1) == chosen).sum())
        ref_lp = torch.log_softmax(ref_rows, dim=-1).gather(1, chosen[:, None])
        cand_lp = torch.log_softmax(cand_rows, dim=-1).gather(1, chosen[:, None])
        error_sum += float((ref_lp - cand_lp).abs().sum())
        total += len(chosen)
    return agree / total, error_sum / total
