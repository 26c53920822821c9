"""The draft-model proposer, driven directly through the step contract of spec/proposer.py.

Two generated tiny models share the tiny tokenizer: the target (2 layers, hidden 64) and a
smaller draft (1 layer, hidden 32, other seed). The oracle is transformers on the draft's
directory: greedy proposals equal its argmax continuation, sampled ones its processed
distribution. Block size 4 and scattered block ids make every context cross blocks.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tandem.common.request import Request, SamplingParams
from tandem.engine import Engine
from tandem.engine.attention_torch import TorchAttentionBackend
from tandem.engine.model_config import ModelConfig
from tandem.engine.sampler import position_generator, processed_probs, race
from tandem.engine.sequence import Sequence
from tandem.engine.spec.config import SpeculativeConfig
from tandem.engine.spec.draft_model import DraftModelProposer, create_draft_model_proposer, draft_generator
from tandem.engine.spec.proposer import ProposerContext, create_proposer
from tandem.engine.tiny_model import write_tiny_llama
from tests.conftest import random_prompts
from tests.unit.oracle import load_hf

BLOCK_SIZE = 4
NUM_BLOCKS = 96
MAX_MODEL_LEN = 256
GREEDY = SamplingParams(max_tokens=64, temperature=0.0)
DRAFT_OVERRIDES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spec_draft")
    target = write_tiny_llama(root / "target", seed=0)
    draft = write_tiny_llama(root / "draft", seed=1, overrides=DRAFT_OVERRIDES)
    return target, draft


def _context(target: Path, **changes: object) -> ProposerContext:
    context = ProposerContext(
        target_config=ModelConfig.from_dir(target),
        device=torch.device("cpu"),
        dtype=torch.float32,
        block_size=BLOCK_SIZE,
        num_blocks=NUM_BLOCKS,
        backend=TorchAttentionBackend(),
        max_model_len=MAX_MODEL_LEN,
        seed=0,
        target_dir=target,
    )
    return replace(context, **changes)  # type: ignore[arg-type]


def _proposer(dirs: tuple[Path, Path], model: Path | None = None) -> DraftModelProposer:
    target, draft = dirs
    config = SpeculativeConfig.parse(
        json.dumps({"method": "draft_model", "model": str(model or draft), "num_speculative_tokens": 4})
    )
    proposer = create_proposer(config, _context(target))
    assert isinstance(proposer, DraftModelProposer)
    return proposer


def _seq(request_id: str, tokens: list[int], table: list[int], sampling: SamplingParams = GREEDY) -> Sequence:
    """A running sequence as `propose` sees it: all computed but the last sampled token."""
    seq = Sequence(Request(request_id, tuple(tokens), sampling), b"", MAX_MODEL_LEN, block_table=list(table))
    seq.num_computed_tokens = len(tokens) - 1
    return seq


def _table(first: int, num_positions: int) -> list[int]:
    """Scattered block ids (stride 3 from `first`) covering `num_positions` positions."""
    return [(first + 3 * b) % NUM_BLOCKS for b in range(-(-num_positions // BLOCK_SIZE))]


@torch.no_grad()
def _hf_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    return load_hf(path)(torch.tensor([tokens])).logits[0, -1].float()


def _hf_greedy(path: Path, tokens: list[int], k: int) -> list[int]:
    """k argmax tokens of the model at `path` (EOS does not stop it: a draft drafts past it)."""
    out: list[int] = []
    for _ in range(k):
        out.append(int(_hf_logits(path, tokens + out).argmax()))
    return out


def test_fresh_batch_proposes_the_drafts_greedy_continuation(dirs: tuple[Path, Path]) -> None:
    proposer = _proposer(dirs)
    prompts = random_prompts([1, 7, 13, 5], 512, seed=3)
    ks = [4, 1, 5, 0]
    seqs = [_seq(f"r{i}", p, _table(i, len(p) + k)) for i, (p, k) in enumerate(zip(prompts, ks))]
    drafts = proposer.propose(seqs, ks)
    for prompt, k, draft in zip(prompts, ks, drafts):
        assert list(draft.token_ids) == _hf_greedy(dirs[1], prompt, k)
        assert draft.probs is None
    assert [proposer.num_valid_tokens(f"r{i}") for i in range(4)] == [4, 7, 17, 0]


def test_writes_only_the_slots_below_num_tokens_plus_k_minus_one(dirs: tuple[Path, Path]) -> None:
    proposer = _proposer(dirs)
    for cache in proposer.kv_caches:
        cache.fill_(float("nan"))
    prompts = random_prompts([6, 9], 512, seed=4)
    ks = [3, 4]
    tables = [_table(10, 6 + 3), _table(11, 9 + 4)]
    proposer.propose([_seq(f"w{i}", p, t) for i, (p, t) in enumerate(zip(prompts, tables))], ks)
    expected = sorted(
        table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        for prompt, k, table in zip(prompts, ks, tables)
        for pos in range(len(prompt) + k - 1)
    )
    for cache in proposer.kv_caches:
        written = ~cache.isnan().flatten(3).any(-1)  # [2, num_blocks, block_size]
        assert written[0].flatten().nonzero().flatten().tolist() == expected
        assert torch.equal(written[0], written[1])


def test_rollback_reuses_valid_kv_across_blocks_and_recomputes_after_zero(dirs: tuple[Path, Path]) -> None:
    proposer = _proposer(dirs)
    bonus = random_prompts([8], 512, seed=5)[0]  # the target's own tokens after rejections
    tokens = random_prompts([6], 512, seed=6)[0]
    table = _table(20, 64)

    def propose(k: int) -> list[int]:
        drafted = list(proposer.propose([_seq("r", tokens, table)], [k])[0].token_ids)
        assert drafted == _hf_greedy(dirs[1], tokens, k)
        assert proposer.num_valid_tokens("r") == len(tokens) + k - 1
        return drafted

    drafted = propose(4)  # positions 6..9 drafted; draft KV valid < 9
    tokens += drafted[:2] + [bonus[0]]  # 2 accepted, the 3rd rejected: target KV valid < 8
    proposer.rollback("r", 8)
    assert proposer.num_valid_tokens("r") == 8
    tokens += bonus[1:3]  # two steps without speculation: positions 9, 10
    drafted = propose(3)  # catches up positions 8..10 (8 starts a block), drafts 11..13
    tokens += drafted + [bonus[3]]  # all 3 accepted: the target's KV is valid < 14
    proposer.rollback("r", 14)
    assert proposer.num_valid_tokens("r") == 13  # the 3rd draft token was never fed to the draft
    tokens += bonus[4:5]
    propose(2)  # catches up positions 13..15
    proposer.rollback("r", 0)  # preempted: new blocks, nothing valid
    assert proposer.num_valid_tokens("r") == 0
    table = _table(41, 64)
    tokens += bonus[5:6]
    propose(5)
    # a proposer that never saw the request agrees
    fresh = _proposer(dirs)
    tokens_then = list(tokens)
    assert fresh.propose([_seq("r", tokens_then, _table(2, 64))], [5])[0].token_ids == tuple(
        _hf_greedy(dirs[1], tokens_then, 5)
    )
    proposer.finish("r")
    assert proposer.num_valid_tokens("r") == 0


def _expected_sampled(
    dirs: tuple[Path, Path], tokens: list[int], drafted: list[int], p: SamplingParams
) -> torch.Tensor:
    rows = []
    for j in range(len(drafted)):
        dist = processed_probs(_hf_logits(dirs[1], tokens + drafted[:j]), p)
        rows.append(dist / dist.sum())
    return torch.stack(rows)


def test_seeded_sampled_proposals_are_reproducible_and_return_the_processed_distribution(
    dirs: tuple[Path, Path],
) -> None:
    p = SamplingParams(max_tokens=64, temperature=0.8, top_k=40, top_p=0.9, seed=7)
    prompt, other = random_prompts([9, 14], 512, seed=8)
    alone = _proposer(dirs).propose([_seq("s", prompt, _table(0, 13), p)], [4])[0]
    mixed = _proposer(dirs).propose(
        [_seq("o", other, _table(1, 19), replace(p, seed=8)), _seq("s", prompt, _table(50, 13), p)], [5, 4]
    )[1]
    assert alone.token_ids == mixed.token_ids
    assert alone.probs is not None and mixed.probs is not None
    assert alone.probs.shape == (4, 512) and alone.probs.dtype == torch.float32
    torch.testing.assert_close(alone.probs, mixed.probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone.probs.sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    drafted = list(alone.token_ids)
    expected = _expected_sampled(dirs, prompt, drafted, p)
    torch.testing.assert_close(alone.probs, expected, atol=1e-5, rtol=0)
    assert [int((row > 0).sum()) <= 40 for row in expected] == [True] * 4
    # each token is the race over the draft's stream at its position, not the target's stream
    for j, token in enumerate(drafted):
        assert token == race(alone.probs[j], draft_generator(7, len(prompt) + j))
        assert (
            draft_generator(7, len(prompt) + j).initial_seed() != position_generator(7, len(prompt) + j).initial_seed()
        )


def test_unseeded_sampled_proposals_draw_from_the_processed_distribution(dirs: tuple[Path, Path]) -> None:
    p = SamplingParams(max_tokens=64, temperature=1.5, top_k=3)
    prompt = random_prompts([5], 512, seed=9)[0]
    draft = _proposer(dirs).propose([_seq("u", prompt, _table(7, 8), p)], [3])[0]
    assert draft.probs is not None
    expected = _expected_sampled(dirs, prompt, list(draft.token_ids), p)
    torch.testing.assert_close(draft.probs, expected, atol=1e-5, rtol=0)
    assert [int((row > 0).sum()) for row in draft.probs] == [3, 3, 3]
    assert all(float(draft.probs[j, t]) > 0 for j, t in enumerate(draft.token_ids))


def _edited_copy(src: Path, dst: Path, name: str, edit: dict) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / name).read_text())
    raw.update(edit)
    (dst / name).write_text(json.dumps(raw))
    return dst


def test_incompatible_drafts_are_refused_naming_the_problem(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    target, draft = dirs
    tokenizer = json.loads((draft / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    swapped = dict(vocab, a=vocab["b"], b=vocab["a"])
    cases = [
        (
            _edited_copy(draft, tmp_path / "vocab", "config.json", {"vocab_size": 600}),
            "vocab size 600 differs from the target's 512; a draft must share the target's vocabulary",
        ),
        (
            _edited_copy(draft, tmp_path / "eos", "generation_config.json", {"eos_token_id": [1]}),
            "EOS token ids [1] differ from the target's [1, 3]",
        ),
        (
            _edited_copy(draft, tmp_path / "short", "config.json", {"max_position_embeddings": 128}),
            "max length 128 is shorter than the target's max_model_len 256; lower max_model_len or use a longer draft",
        ),
        (
            _edited_copy(draft, tmp_path / "tok", "tokenizer.json", {"model": dict(tokenizer["model"], vocab=swapped)}),
            f"tokenizer.json differs from the target's (2 tokens have other ids, first: token 'a' is id "
            f"{vocab['b']} in the draft and {vocab['a']} in the target)",
        ),
    ]
    for path, message in cases:
        config = SpeculativeConfig("draft_model", 4, model=str(path))
        with pytest.raises(ValueError) as info:
            create_draft_model_proposer(config, _context(target))
        assert str(info.value) == f"draft model {path}: {message}"


def test_the_target_as_its_own_draft_proposes_the_targets_greedy_tokens(dirs: tuple[Path, Path]) -> None:
    target = dirs[0]
    proposer = _proposer(dirs, model=target)
    engine = Engine.from_pretrained(target, num_blocks=64)
    prompts = random_prompts([3, 11, 20], 512, seed=10)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    seqs = [
        _seq(f"t{i}", p + [o.token_ids[0]], _table(i, len(p) + 6)) for i, (p, o) in enumerate(zip(prompts, outputs))
    ]
    drafts = proposer.propose(seqs, [5, 5, 5])
    assert [list(d.token_ids) for d in drafts] == [list(o.token_ids[1:]) for o in outputs]


def test_drafts_stop_at_the_context_limit(dirs: tuple[Path, Path]) -> None:
    proposer = _proposer(dirs)
    prompts = random_prompts([MAX_MODEL_LEN - 2, MAX_MODEL_LEN - 1], 512, seed=11)
    seqs = [_seq(f"m{i}", p, _table(i, MAX_MODEL_LEN)) for i, p in enumerate(prompts)]
    drafts = proposer.propose(seqs, [5, 5])
    assert [list(d.token_ids) for d in drafts] == [
        _hf_greedy(dirs[1], prompts[0], 2),
        _hf_greedy(dirs[1], prompts[1], 1),
    ]
    assert [proposer.num_valid_tokens("m0"), proposer.num_valid_tokens("m1")] == [MAX_MODEL_LEN - 1, MAX_MODEL_LEN - 1]
