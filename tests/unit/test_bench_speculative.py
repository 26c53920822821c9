"""The `speculative` bench section: its cycle finder (a table), its copy-heavy prompts (their
greedy continuation repeats the prompt's cycle), and the whole section in its quick size."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine import Engine, SamplingParams
from tandem.loadtest.suite import speculative
from tandem.loadtest.suite.context import BenchContext, write_bench_model
from tandem.loadtest.suite.run import SECTIONS


@pytest.mark.parametrize(
    ("tokens", "min_repeats", "expected"),
    [
        ([1, 2, 3, 3, 3, 3], 3, (1, 2)),  # period 1 from index 2: four copies
        ([1, 2, 3, 3, 3, 3], 5, None),  # ... but not five
        ([9, 1, 2, 1, 2, 1, 2], 3, (2, 1)),  # [1, 2] three times
        ([9, 1, 2, 1, 2, 1], 3, None),  # 2.5 periods of [1, 2]; period 1 holds only [1]
        ([5, 6, 7, 5, 6, 7], 2, (3, 0)),  # the whole list, period 3
        ([4, 5, 6, 7, 4, 5, 6, 7, 4], 2, (4, 0)),  # a trailing partial period counts towards the length
        ([1, 2, 3, 4], 2, None),
        ([], 1, None),
    ],
)
def test_find_cycle(tokens: list[int], min_repeats: int, expected: tuple[int, int] | None) -> None:
    assert speculative.find_cycle(tokens, min_repeats) == expected


def test_find_cycle_respects_max_period() -> None:
    tokens = list(range(5)) * 3
    assert speculative.find_cycle(tokens, 3) == (5, 0)
    assert speculative.find_cycle(tokens, 3, max_period=4) is None


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bench_model(tmp_path_factory.mktemp("bench"))


def test_cycle_prompts_continue_with_their_own_cycle(bench_model: Path) -> None:
    engine = Engine.from_pretrained(bench_model, num_threads=1)
    prompts = speculative.cycle_prompts(engine, 2, rollout_tokens=speculative.ROLLOUT_TOKENS)
    assert len(prompts) == 2
    outputs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        start = prompt[: speculative.START_REPEATS]
        assert len(set(start)) == 1  # one token repeated
        cycle = speculative.find_cycle(prompt[speculative.START_REPEATS :], speculative.PROMPT_CYCLES)
        assert cycle is not None
        period, _ = cycle
        assert prompt[-period:] == prompt[-2 * period : -period] == prompt[-3 * period : -2 * period]
        # the continuation repeats the cycle: a span of the prompt
        assert list(out.token_ids) == [prompt[len(prompt) - period + i % period] for i in range(16)]


def test_quick_speculative_section(bench_model: Path, tmp_path: Path) -> None:
    assert SECTIONS["speculative"] == (
        "Speculative decoding: n-gram and draft model",
        "tandem.loadtest.suite.speculative",
    )
    ctx = BenchContext(bench_model, tmp_path, lambda _: None, quick=True)
    section = speculative.run(ctx)
    assert [row[:3] for row in section.table[1:]] == [
        (workload, method, str(c))
        for workload, method in (
            ("(a) copy-heavy", "ngram"),
            ("(b) draft model, random prompts", "draft_model"),
            ("(b) draft model, copy-heavy prompts", "draft_model"),
            ("(c) low acceptance, random prompts", "ngram"),
        )
        for c in (1, 8)
    ]
    figures = {f.name: f for f in section.figures}
    assert len(figures) == 24
    # a cycle copied from the prompt: every n-gram draft is right; 16 tokens: drafts of 4, 4 and 4
    # after the first token (the last draft is cut to the 3 tokens left after its bonus)
    assert figures["(a) copy-heavy: acceptance rate at concurrency 1"].value == 1.0
    assert section.table[0][8] == "drafts" and section.table[1][8] == "3"  # the sample the rates rest on
    assert figures["(a) copy-heavy: speedup at concurrency 1"].goal == 2.0
    assert figures["(c) low acceptance, random prompts: speedup at concurrency 1"].goal == 0.9
    assert figures["(b) draft model, random prompts: speedup at concurrency 1"].goal == 1.0
    assert all(f.value > 0 for f in section.figures if "speedup" in f.name)
    assert "cost ratio" in section.notes[0]
