"""Speculative decoding's pure parts: the n-gram lookup, the skip rules (tables), rejection
sampling's distribution (chi-square), and the `--speculative-config` errors."""

from __future__ import annotations

import random

import pytest
import torch

from tandem.cli import build_parser
from tandem.cli.serve import worker_config
from tandem.common.options import parse, to_argv
from tandem.common.request import SamplingParams, StructuredOutput
from tandem.engine.config import EngineConfig
from tandem.engine.sampler import position_generator, processed_probs, race
from tandem.engine.spec.ngram import NgramIndex, propose_ngram
from tandem.engine.spec.proposer import Draft
from tandem.engine.spec.rejection import verify_greedy, verify_sampled
from tandem.engine.spec.skip import batch_may_decide, params_allow_speculation, skip_step

NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'


@pytest.mark.parametrize(
    ("tokens", "lo", "hi", "k", "expected"),
    [
        ([1, 2, 3, 4, 1, 2, 3, 5, 1, 2], 2, 4, 3, (3, 5, 1)),  # most recent occurrence of (1, 2)
        ([1, 2, 3, 4, 1, 2], 2, 4, 3, (3, 4, 1)),
        ([9, 1, 2, 3, 7, 1, 2, 8, 1, 2, 3], 2, 4, 2, (7, 1)),  # the longest n (3) wins over n = 2
        ([5, 6, 5, 6], 2, 2, 5, (5, 6)),  # a proposal stops at the end of the tokens
        ([1, 2, 3, 4], 1, 3, 3, ()),  # no earlier occurrence
        ([7], 1, 4, 3, ()),
        ([1, 2, 1, 2], 2, 2, 0, ()),
    ],
)
def test_ngram_lookup(tokens: list[int], lo: int, hi: int, k: int, expected: tuple[int, ...]) -> None:
    assert propose_ngram(tokens, lo, hi, k) == expected
    assert NgramIndex(lo, hi).propose(tokens, k) == expected


@pytest.mark.parametrize(("lo", "hi", "alphabet"), [(2, 2, 3), (1, 3, 4), (2, 4, 6), (3, 5, 2)])
def test_ngram_index_follows_a_growing_sequence(lo: int, hi: int, alphabet: int) -> None:
    """Extended by 1 to 5 tokens per step (a step's accepted drafts plus one), the index
    proposes exactly what a full scan of the tokens proposes, at every step."""
    gen = random.Random(lo * 100 + hi * 10 + alphabet)
    index = NgramIndex(lo, hi)
    tokens = [gen.randrange(alphabet)]
    num_nonempty = 0
    while len(tokens) < 300:
        k = gen.randrange(0, 5)
        expected = propose_ngram(tokens, lo, hi, k)
        assert index.propose(tokens, k) == expected, tokens
        num_nonempty += bool(expected)
        tokens.extend(gen.randrange(alphabet) for _ in range(gen.randrange(1, 6)))
    assert num_nonempty > 20  # the comparison covered real matches, not only empty drafts


@pytest.mark.parametrize(
    ("num_running", "num_batch_tokens", "disable_by", "skipped"),
    [
        (1, 1, None, False),
        (64, 64, None, False),
        (4, 511, None, False),
        (4, 512, None, True),  # compute-bound
        (8, 8, 8, False),
        (9, 9, 8, True),  # more running sequences than disable_by_batch_size
    ],
)
def test_skip_step_table(num_running: int, num_batch_tokens: int, disable_by: int | None, skipped: bool) -> None:
    assert skip_step(num_running, num_batch_tokens, disable_by) is skipped


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3, logprobs=2), True),
        (SamplingParams(structured_output=StructuredOutput("json_object", "")), False),
        (SamplingParams(presence_penalty=0.5), False),
        (SamplingParams(frequency_penalty=-0.5), False),
        (SamplingParams(repetition_penalty=1.2), False),
        (SamplingParams(logit_bias=((7, 2.0),)), False),
        (SamplingParams(min_tokens=2), False),
        (SamplingParams(bad_words_token_ids=((5, 6),)), False),
    ],
)
def test_requests_with_grammar_or_logits_processors_are_never_speculated(params: SamplingParams, allowed: bool) -> None:
    assert params_allow_speculation(params) is allowed


def test_batch_decisions() -> None:
    assert batch_may_decide(SamplingParams(temperature=0.0, seed=3))
    assert batch_may_decide(SamplingParams(temperature=1.0))
    assert not batch_may_decide(SamplingParams(temperature=1.0, seed=3))


def test_verify_greedy_accepts_while_equal_then_corrects() -> None:
    logits = torch.eye(5)[[2, 4, 1, 3]]  # argmax per row: 2, 4, 1, 3
    assert verify_greedy(logits, [2, 4, 1]) == [2, 4, 1, 3]  # all accepted + bonus
    assert verify_greedy(logits, [2, 0, 1]) == [2, 4]  # correction at the first mismatch
    assert verify_greedy(logits, [0, 4, 1]) == [2]


# Chi-square critical values at significance 0.001, by degrees of freedom (the support of the
# target distribution minus one: top-k / top-p shrink it).
CHI2_CRITICAL = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}
NUM_SEEDS = 3000


def _passes_chi_square(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's statistic of `counts` against `probs` (normalised), below the critical value."""
    expected = probs / probs.sum() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing outside the target's support
    statistic = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return statistic < CHI2_CRITICAL[int(keep.sum()) - 1]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=6, top_p=0.9)],
    ids=["plain", "topk_topp"],
)
@pytest.mark.parametrize("draft_kind", ["point_mass", "draft_probs"])
def test_rejection_sampling_keeps_the_target_distribution(params: SamplingParams, draft_kind: str) -> None:
    """8 tokens, fixed target logits for 3 rows. For seeds 0..N-1 (fixed), the first emitted
    token with speculation and the token sampled without it both follow p = the processed
    target distribution of row 0: each passes a chi-square test against p (df = support - 1, p < 0.001
    rejected), and the second token, when emitted, follows row 1's."""
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(3, 8, generator=gen) * 2  # [1 + 2 drafts, vocab]
    q = torch.softmax(torch.randn(2, 8, generator=gen), dim=-1)  # the draft's distribution
    p0, p1 = processed_probs(logits[0], params), processed_probs(logits[1], params)
    with_spec, without, second = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    for seed in range(NUM_SEEDS):
        sp = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed)
        if draft_kind == "point_mass":
            draft = Draft((int(p0.argmax()), int(p1.argmax())))  # likely tokens: often accepted
        else:
            tokens = tuple(race(q[i], position_generator(seed, 100 + i, b"draft")) for i in range(2))
            draft = Draft(tokens, q)
        out = verify_sampled(logits, draft, sp, 100, torch.Generator())
        with_spec[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        without[race(p0, position_generator(seed, 100))] += 1
    assert _passes_chi_square(without, p0)
    assert _passes_chi_square(with_spec, p0)
    assert second.sum() > 200
    assert _passes_chi_square(second, p1)


def test_seeded_verification_is_reproducible() -> None:
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=1.0, seed=42)
    runs = [verify_sampled(logits, Draft((1, 2)), params, 7, torch.Generator().manual_seed(i)) for i in range(3)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"method": "ngram"}', "speculative config: 'num_speculative_tokens' is required"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "speculative config: 'method' must be one of"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "'num_speculative_tokens' must be in [1, 16], got 0"),
        ("{", "speculative config is not valid JSON"),
    ],
)
def test_bad_speculative_config_names_the_field(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        EngineConfig(speculative_config=text)
    assert message in str(info.value)
    with pytest.raises(ValueError) as info:
        parse(EngineConfig, ["--speculative-config", text])
    assert message in str(info.value)


def test_speculative_config_flag_on_decode_and_up_round_trips() -> None:
    config = EngineConfig(speculative_config=NGRAM)
    assert to_argv(config) == ["--speculative-config", NGRAM]
    assert parse(EngineConfig, to_argv(config)) == config
    args = build_parser("decode").parse_args(["decode", "--speculative-config", NGRAM])
    assert worker_config(args).engine.speculative_config == NGRAM
    args = build_parser("up").parse_args(["up", "--speculative-config", NGRAM])
    assert args.speculative_config == NGRAM
