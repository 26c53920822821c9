"""A draft model for the bench target (issue 17, benchmark (b)), made on this machine.

Recipe (`make_bench_draft`), deterministic and bounded: a fixed number of steps on one CPU
thread (95 s for the bench model on a shared, loaded 2-core development machine):
1. Shape: the target's config with `num_layers` decoder layers (default 1) and an MLP of
   `intermediate_size` (default half the target's); same vocabulary, heads and head dim.
2. Init: the target's embeddings, final norm and lm_head, and its first `num_layers` layers
   (attention as is, MLP rows/columns sliced to the smaller width): a truncated target.
3. Data: the target's own greedy continuations (transformers `generate`, EOS ignored) of
   fixed-seed random prompts; the target's logits over those sequences are the teacher.
4. Distil: `steps` Adam steps on cross-entropy with the target's greedy tokens (what greedy
   acceptance needs) plus KL(teacher || draft) (what sampled acceptance needs), over the
   positions that predict the continuation, minibatches drawn from a seeded generator, on
   one CPU thread (the same bytes on any machine with the same library versions).
5. Measure: teacher-forced greedy agreement (draft argmax == target greedy token) on held-out
   prompts, before and after distillation: an estimate of the per-token acceptance rate.
With random weights the target's continuations are nearly random functions of the
context (about 39 distinct tokens in 48), so a one-layer draft learns only part of them:
on the bench model it agrees on 0.240 of held-out tokens (0.112 for the truncated target
before distillation; the recipe file records the measured figures).
The cost ratio counts matmul weights per token (q/k/v/o, MLP, lm_head) of target over draft;
a draft below `min_cost_ratio` is refused. Attention over the context scales with layers x
KV heads x head dim, which the draft cuts by the same layer factor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
RECIPE_FILE = "draft_recipe.json"


@dataclass(frozen=True)
class DistillConfig:
    num_layers: int = 1
    intermediate_size: int | None = None  # default: half the target's
    num_prompts: int = 1024  # training sequences; `num_eval_prompts` more are held out
    num_eval_prompts: int = 16
    prompt_len: int = 16
    continuation_len: int = 48
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-3
    seed: int = 0
    min_cost_ratio: float = 4.0


@dataclass(frozen=True)
class BenchDraft:
    model_dir: Path
    cost_ratio: float  # target's matmul weights per token / the draft's
    agreement_before: float  # held-out teacher-forced greedy agreement of the truncated init
    agreement_after: float  # ... after distillation
    config: DistillConfig

    @property
    def description(self) -> str:
        c = self.config
        return (
            f"draft: {c.num_layers} layer(s) with MLP width {self._width()}, initialised from the target's "
            f"embeddings, lm_head, final norm and first layer(s) (MLP sliced), then distilled for {c.steps} "
            f"Adam steps (lr {c.lr}, batch {c.batch_size}, seed {c.seed}) on cross-entropy with the target's "
            f"greedy tokens plus KL to its logits, over its own greedy continuations ({c.continuation_len} "
            f"tokens) of {c.num_prompts} random {c.prompt_len}-token prompts; {self.cost_ratio:.2f}x fewer "
            f"matmul weights per token than the target; teacher-forced greedy agreement on "
            f"{c.num_eval_prompts} held-out prompts {self.agreement_before:.3f} before, "
            f"{self.agreement_after:.3f} after distillation"
        )

    def _width(self) -> int:
        return int(json.loads((self.model_dir / "config.json").read_text())["intermediate_size"])


def make_bench_draft(target_dir: Path, out_dir: Path, config: DistillConfig | None = None) -> BenchDraft:
    """Build the draft for `target_dir` into `out_dir` (reused when it already holds a draft
    made with the same recipe) and return it with how it was made."""
    config = config or DistillConfig()
    recipe_path = out_dir / RECIPE_FILE
    if recipe_path.is_file():
        saved = json.loads(recipe_path.read_text())
        if saved["config"] == asdict(config):
            return BenchDraft(out_dir, saved["cost_ratio"], saved["agreement_before"], saved["agreement_after"], config)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32, local_files_only=True).eval()
    draft = _truncated_copy(target, config)
    ratio = _matmul_weights(target.config.to_dict()) / _matmul_weights(draft.config.to_dict())
    if ratio < config.min_cost_ratio:
        raise ValueError(f"draft is only {ratio:.2f}x cheaper than the target; need {config.min_cost_ratio}x")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sequences, teacher = _teacher_data(target, config)
        train, held_out = slice(0, config.num_prompts), slice(config.num_prompts, None)
        before = _agreement(draft, sequences[held_out], config.prompt_len)
        _distil(draft, sequences[train], teacher[train], config)
        after = _agreement(draft, sequences[held_out], config.prompt_len)
    finally:
        torch.set_num_threads(threads)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    draft.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (target_dir / name).is_file():
            shutil.copyfile(target_dir / name, out_dir / name)
    result = BenchDraft(out_dir, ratio, before, after, config)
    recipe = {"config": asdict(config), "cost_ratio": ratio, "agreement_before": before, "agreement_after": after}
    recipe_path.write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    return result


def _truncated_copy(target: Any, config: DistillConfig) -> Any:
    from transformers import AutoModelForCausalLM

    width = config.intermediate_size or target.config.intermediate_size // 2
    draft_config = target.config.__class__.from_dict(
        {**target.config.to_dict(), "num_hidden_layers": config.num_layers, "intermediate_size": width}
    )
    draft = AutoModelForCausalLM.from_config(draft_config, dtype=torch.float32)
    source = target.state_dict()
    state = {}
    for name, tensor in draft.state_dict().items():
        value = source[name]
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            value = value[:width]  # [intermediate, hidden]: keep the first `width` units
        elif name.endswith("mlp.down_proj.weight"):
            value = value[:, :width]  # [hidden, intermediate]
        state[name] = value.clone()
        assert state[name].shape == tensor.shape
    draft.load_state_dict(state)
    return draft


def _matmul_weights(config: dict[str, Any]) -> int:
    """Weights one token multiplies through: per layer q, k, v, o and the MLP, plus lm_head."""
    hidden, head_dim = (
        config["hidden_size"],
        config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
    )
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    per_layer = hidden * (2 * q + 2 * kv) + 3 * hidden * config["intermediate_size"]
    return int(config["num_hidden_layers"] * per_layer + hidden * config["vocab_size"])


@torch.no_grad()
def _teacher_data(target: Any, config: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences `[n, prompt + continuation]` (random prompts from token 4 up: no special
    tokens, then the target's greedy tokens) and the target's logits `[n, len, vocab]`."""
    n = config.num_prompts + config.num_eval_prompts
    generator = torch.Generator().manual_seed(config.seed)
    prompts = torch.randint(4, target.config.vocab_size, (n, config.prompt_len), generator=generator)
    sequences = target.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=config.continuation_len,
        min_new_tokens=config.continuation_len,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return sequences, target(sequences).logits.float()


def _distil(draft: Any, sequences: torch.Tensor, teacher: torch.Tensor, config: DistillConfig) -> None:
    first = config.prompt_len - 1  # the row that predicts the first continuation token
    targets = torch.softmax(teacher[:, first:-1], dim=-1)
    optimizer = torch.optim.Adam(draft.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 1)
    draft.train()
    for _ in range(config.steps):
        batch = torch.randint(0, sequences.shape[0], (config.batch_size,), generator=generator)
        logits = draft(sequences[batch]).logits[:, first:-1]  # [batch, continuation, vocab]
        log_probs = torch.log_softmax(logits, dim=-1)
        greedy = sequences[batch][:, first + 1 :]  # the target's greedy tokens
        loss = torch.nn.functional.nll_loss(log_probs.flatten(0, 1), greedy.flatten())
        loss = loss + torch.nn.functional.kl_div(log_probs, targets[batch], reduction="batchmean") / logits.shape[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    draft.eval()


@torch.no_grad()
def _agreement(draft: Any, sequences: torch.Tensor, prompt_len: int) -> float:
    """Share of continuation positions where the draft's argmax is the target's greedy token."""
    first = prompt_len - 1
    predicted = draft(sequences).logits[:, first:-1].argmax(-1)
    return float((predicted == sequences[:, prompt_len:]).float().mean())
