"""Speculative decoding is exact under greedy: the same tokens (and logprobs, 1e-5) as the
engine without it, on every engine path, for every proposer method in `METHODS`.

Prompts repeat spans (a random span written three times, then a different tail), so the
n-gram proposer finds matches in the prompt and in the model's own output; every case also
asserts that drafts were accepted, so none can pass without verifying anything. The
`draft_model` method drafts with the target's first layer alone (its embeddings, first decoder
layer, final norm and head: a layer-skip draft), which agrees with the target often but not
always, so both acceptance and rejection are exercised.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.engine import Engine, FinishReason, SamplingParams
from tandem.engine.outputs import GenerationOutput
from tandem.engine.spec import adaptive
from tests.conftest import random_prompts

METHODS = ("ngram", "draft_model")


def first_layer_draft(target: Path, out: Path) -> Path:
    """A copy of `target` that keeps only decoder layer 0 (and the embeddings, norm and head)."""
    if out.is_dir():
        return out
    out.mkdir()
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))
    for file in target.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(str(file))
            save_file(
                {k: v for k, v in tensors.items() if ".layers." not in k or ".layers.0." in k}, str(out / file.name)
            )
        elif file.name != "config.json":
            shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="module")
def spec_configs(tiny_model_dir: Path) -> dict[str, str]:
    draft = first_layer_draft(tiny_model_dir, tiny_model_dir.parent / "tiny-llama-first-layer")
    return {
        "ngram": '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}',
        "draft_model": json.dumps({"method": "draft_model", "model": str(draft), "num_speculative_tokens": 4}),
    }


GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def repeated_prompts(vocab: int, seed: int) -> list[list[int]]:
    spans = random_prompts([5, 9, 3, 14], vocab, seed=seed)
    tails = random_prompts([2, 4, 1, 6], vocab, seed=seed + 1)
    return [span * 3 + tail for span, tail in zip(spans, tails)]


def run_pair(
    path: Path, config: str, prompts: list[list[int]], params: SamplingParams, **options: object
) -> tuple[list[GenerationOutput], list[GenerationOutput], Engine]:
    """Generate with and without speculation on equal engines; both end drained."""
    base = Engine.from_pretrained(path, **options)
    spec = Engine.from_pretrained(path, speculative_config=config, **options)
    expected, got = base.generate(prompts, params), spec.generate(prompts, params)
    for engine in (base, spec):
        engine.check_integrity()
        assert engine.is_drained()
    return expected, got, spec


def assert_same(expected: list[GenerationOutput], got: list[GenerationOutput], spec: Engine) -> None:
    assert [list(o.token_ids) for o in got] == [list(o.token_ids) for o in expected]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
    stats = spec.stats
    assert stats.spec_num_accepted_tokens > 0
    assert sum(stats.spec_accepted_per_position) == stats.spec_num_accepted_tokens
    assert stats.spec_accepted_per_position[0] <= stats.spec_num_drafts
    assert stats.num_generated_tokens == sum(len(o.token_ids) for o in got)


@pytest.fixture(scope="module")
def vocab(tiny_model_dir: Path) -> int:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=1).model_config.vocab_size


@pytest.fixture(autouse=True)
def no_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cost model (never enough timed steps) the draft lengths follow the fixed
    acceptance floor, not this machine's step timings: whether a probe falls within a short
    request (so whether drafts were accepted) and the step counts below cannot depend on them."""
    monkeypatch.setattr(adaptive, "MIN_COST_SAMPLES", sys.maxsize)


@pytest.mark.parametrize("method", METHODS)
def test_plain_batch_equal(method: str, tiny_model_dir: Path, vocab: int, spec_configs: dict[str, str]) -> None:
    prompts = repeated_prompts(vocab, seed=5)
    expected, got, spec = run_pair(tiny_model_dir, spec_configs[method], prompts, GREEDY, num_blocks=64)
    assert_same(expected, got, spec)
    stats = spec.stats
    assert stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens > 0  # drafts accepted and rejected
    if method == "ngram":  # the repeated spans make most n-gram drafts right
        assert stats.num_steps < 48  # several tokens per step


@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_equal(method: str, tiny_model_dir: Path, vocab: int, spec_configs: dict[str, str]) -> None:
    prompts = repeated_prompts(vocab, seed=6)
    expected, got, spec = run_pair(
        tiny_model_dir, spec_configs[method], prompts, GREEDY, num_blocks=64, max_prefill_chunk_tokens=5
    )
    assert_same(expected, got, spec)


@pytest.mark.parametrize("method", METHODS)
def test_prefix_hit_equal(method: str, tiny_model_dir: Path, vocab: int, spec_configs: dict[str, str]) -> None:
    first = repeated_prompts(vocab, seed=7)[3]  # 48 tokens: 3 full blocks
    second = first[:40] + first[:5]
    base = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    spec = Engine.from_pretrained(tiny_model_dir, num_blocks=64, speculative_config=spec_configs[method])
    for prompt in (first, second):
        expected, got = base.generate([prompt], GREEDY)[0], spec.generate([prompt], GREEDY)[0]
        assert list(got.token_ids) == list(expected.token_ids)
    assert got.num_cached_tokens == expected.num_cached_tokens == 32
    assert spec.stats.spec_num_accepted_tokens > 0
    spec.check_integrity()
    assert spec.is_drained()


@pytest.mark.parametrize("method", METHODS)
def test_preemption_equal(method: str, tiny_model_dir: Path, vocab: int, spec_configs: dict[str, str]) -> None:
    prompts = repeated_prompts(vocab, seed=8)
    expected, got, spec = run_pair(tiny_model_dir, spec_configs[method], prompts, GREEDY, num_blocks=9, block_size=16)
    assert_same(expected, got, spec)
    assert spec.stats.num_preemptions > 0


@pytest.mark.parametrize("method", METHODS)
def test_stop_and_max_tokens_inside_accepted_runs(
    method: str, tiny_model_dir: Path, vocab: int, spec_configs: dict[str, str]
) -> None:
    prompts = repeated_prompts(vocab, seed=5)
    reference, _, _ = run_pair(tiny_model_dir, spec_configs[method], prompts, GREEDY, num_blocks=64)
    base = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    spec = Engine.from_pretrained(tiny_model_dir, num_blocks=64, speculative_config=spec_configs[method])
    # stops and max_tokens at many positions: some land inside accepted runs
    for i in (1, 2, 3, 5, 6, 9, 11, 14, 19):
        stops = [SamplingParams(max_tokens=48, temperature=0.0, stop_token_ids=(o.token_ids[i],)) for o in reference]
        lengths = [SamplingParams(max_tokens=i, temperature=0.0, ignore_eos=True)] * len(prompts)
        for params in (stops, lengths):
            generated_before = spec.stats.num_generated_tokens
            expected, got = base.generate(prompts, params), spec.generate(prompts, params)
            assert [list(o.token_ids) for o in got] == [list(o.token_ids) for o in expected]
            assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
            assert spec.stats.num_generated_tokens - generated_before == sum(len(o.token_ids) for o in got)
            spec.check_integrity()
            assert spec.is_drained()
    assert got[0].finish_reason is FinishReason.LENGTH and len(got[0].token_ids) == 19


@pytest.mark.parametrize("method", METHODS)
def test_logprobs_equal(method: str, tiny_model_dir: Path, vocab: int, spec_configs: dict[str, str]) -> None:
    prompts = repeated_prompts(vocab, seed=9)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=3)
    expected, got, spec = run_pair(tiny_model_dir, spec_configs[method], prompts, params, num_blocks=64)
    assert_same(expected, got, spec)
    for e, g in zip(expected, got):
        assert e.logprobs is not None and g.logprobs is not None and len(g.logprobs) == len(e.logprobs) == 32
        for le, lg in zip(e.logprobs, g.logprobs):
            assert lg.token_id == le.token_id
            assert [t for t, _ in lg.top] == [t for t, _ in le.top]
            torch.testing.assert_close(
                torch.tensor([lg.logprob, *(v for _, v in lg.top)]),
                torch.tensor([le.logprob, *(v for _, v in le.top)]),
                atol=1e-5,
                rtol=0,
            )


@pytest.mark.parametrize("method", METHODS)
def test_decode_role_reserve_commit_equal(
    method: str, tiny_model_dir: Path, vocab: int, spec_configs: dict[str, str]
) -> None:
    """A pulled prompt (KV copied into the reservation), then speculation: the same tokens."""
    prefill = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    single = Engine.from_pretrained(tiny_model_dir, num_blocks=64)
    decode = Engine.from_pretrained(tiny_model_dir, num_blocks=64, speculative_config=spec_configs[method])
    for i, prompt in enumerate(repeated_prompts(vocab, seed=10)):
        expected = list(single.generate([prompt], GREEDY)[0].token_ids)
        rid = f"r{i}"
        prefill.add_request(rid, prompt, GREEDY, hand_off=True)
        first = _first(prefill)
        held = prefill.held[rid]
        res = decode.reserve(rid, prompt, GREEDY, first)
        assert res is not None
        missing = res.missing_block_ids
        src = held.block_ids[res.num_cached_blocks : res.num_full_blocks]
        for src_cache, dst_cache in zip(prefill.kv_caches, decode.kv_caches):
            dst_cache[:, list(missing)] = src_cache[:, list(src)]
        prefill.release_held(rid)
        decode.commit(rid)
        tokens = [first]
        while decode.has_unfinished():
            for out in decode.step():
                tokens.extend(out.new_token_ids)
        assert tokens == expected
    assert decode.stats.spec_num_accepted_tokens > 0
    for engine in (prefill, decode):
        engine.check_integrity()
        assert engine.is_drained()


def _first(prefill: Engine) -> int:
    while True:
        for out in prefill.step():
            assert out.finish_reason is FinishReason.HANDOFF
            return out.new_token_ids[0]
