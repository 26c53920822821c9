"""The bench draft recipe on a tiny target: seconds, the target's vocabulary, a usable draft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tandem.common.request import Request, SamplingParams
from tandem.engine.attention_torch import TorchAttentionBackend
from tandem.engine.model_config import ModelConfig
from tandem.engine.sequence import Sequence
from tandem.engine.spec.config import SpeculativeConfig
from tandem.engine.spec.draft_model import create_draft_model_proposer
from tandem.engine.spec.proposer import ProposerContext
from tandem.engine.tiny_model import write_tiny_llama
from tandem.loadtest.bench.spec_draft import RECIPE_FILE, DistillConfig, make_bench_draft

QUICK = DistillConfig(
    num_prompts=16, num_eval_prompts=4, prompt_len=8, continuation_len=8, steps=10, batch_size=4, lr=5e-3
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 layers: one draft layer plus the shared lm_head is then > 4x cheaper per token
    return write_tiny_llama(tmp_path_factory.mktemp("bench_draft") / "target", overrides={"num_hidden_layers": 8})


def test_quick_recipe_makes_a_draft_with_the_targets_vocabulary(target: Path, tmp_path: Path) -> None:
    result = make_bench_draft(target, tmp_path / "draft", QUICK)
    draft_dir = result.model_dir
    assert draft_dir == tmp_path / "draft"
    draft_config = ModelConfig.from_dir(draft_dir)
    target_config = ModelConfig.from_dir(target)
    assert (draft_config.num_layers, draft_config.intermediate_size) == (1, 64)
    assert (draft_config.vocab_size, draft_config.eos_token_ids) == (512, target_config.eos_token_ids)
    assert (draft_dir / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()
    # target: 8 * (64 * (64 + 64 + 32 + 32) + 3 * 64 * 128) + 64 * 512; draft: 1 layer with MLP 64
    assert result.cost_ratio == 327680 / 57344
    assert 0.0 <= result.agreement_before <= 1.0 and 0.0 <= result.agreement_after <= 1.0
    assert "5.71x fewer matmul weights per token than the target" in result.description
    assert "distilled for 10 Adam steps (lr 0.005, batch 4, seed 0)" in result.description
    # the engine's proposer accepts it for this target and drafts with it
    context = ProposerContext(
        target_config=target_config,
        device=torch.device("cpu"),
        dtype=torch.float32,
        block_size=16,
        num_blocks=4,
        backend=TorchAttentionBackend(),
        max_model_len=64,
        seed=0,
        target_dir=target,
    )
    proposer = create_draft_model_proposer(SpeculativeConfig("draft_model", 3, model=str(draft_dir)), context)
    seq = Sequence(Request("r", (5, 6, 7), SamplingParams(temperature=0.0)), b"", 64, block_table=[2])
    assert len(proposer.propose([seq], [3])[0].token_ids) == 3
    # a second call with the same recipe reuses the directory
    weights = draft_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = make_bench_draft(target, draft_dir, QUICK)
    assert again == result and weights.stat().st_mtime_ns == before
    assert json.loads((draft_dir / RECIPE_FILE).read_text())["cost_ratio"] == result.cost_ratio


def test_a_draft_under_the_cost_ratio_is_refused(tmp_path: Path) -> None:
    shallow = write_tiny_llama(tmp_path / "target")  # 2 layers: a 1-layer draft saves too little
    with pytest.raises(ValueError) as info:
        make_bench_draft(shallow, tmp_path / "draft", QUICK)
    assert str(info.value) == "draft is only 1.86x cheaper than the target; need 4.0x"
    assert not (tmp_path / "draft").exists()
