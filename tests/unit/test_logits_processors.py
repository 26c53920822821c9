"""Sampling controls: each equals a reference written from its formula (vLLM's semantics),
row by row and through the engine against transformers' logits of the same prefix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tandem.common.request import SamplingParams
from tandem.engine import Engine
from tandem.engine.logits_processors import TokenHistory, apply_controls
from tests.conftest import random_prompts
from tests.unit.oracle import hf_prompt_logits

EOS = frozenset({3})


def reference(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """The formulas, one token at a time: bad words, bias, min_tokens, repetition, frequency, presence."""
    out = list(logits)
    for word in p.bad_words_token_ids:
        prefix = list(word[:-1])
        if len(word) - 1 <= len(output) and (not prefix or output[len(output) - len(prefix) :] == prefix):
            out[word[-1]] = -math.inf
    for token, bias in p.logit_bias:
        out[token] += bias
    if len(output) < p.min_tokens:
        for token in EOS | set(p.stop_token_ids):
            out[token] = -math.inf
    for token in range(len(out)):
        if token in prompt or token in output:
            out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
        count = output.count(token)
        out[token] -= p.frequency_penalty * count
        out[token] -= p.presence_penalty * (1 if count else 0)
    return out


CONTROLS = {
    "repetition": SamplingParams(repetition_penalty=1.7),
    "repetition_below_1": SamplingParams(repetition_penalty=0.6),
    "frequency": SamplingParams(frequency_penalty=1.5),
    "presence": SamplingParams(presence_penalty=-1.25),
    "logit_bias": SamplingParams(logit_bias=((5, 7.5), (2, -100.0), (11, 3.0))),
    "min_tokens": SamplingParams(max_tokens=16, min_tokens=4, stop_token_ids=(7, 9)),
    "bad_words": SamplingParams(bad_words_token_ids=((4,), (6, 8), (1, 2, 10))),
    "all": SamplingParams(
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.75,
        logit_bias=((8, 2.0),),
        min_tokens=3,
        bad_words_token_ids=((6, 8),),
    ),
}


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_rows_equal_the_formulas(name: str) -> None:
    p = CONTROLS[name]
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 16, generator=g) * 4  # float32 [rows, vocab]
    histories = [
        TokenHistory([1, 5, 5, 9], []),
        TokenHistory([2, 2], [6, 4, 8, 8, 1, 2]),
        TokenHistory([12], [1, 2, 6, 3, 6]),
    ]
    out = apply_controls(logits, [p] * 3, histories, EOS)
    for row, h in enumerate(histories):
        expected = reference(logits[row].tolist(), p, list(h.prompt_token_ids), list(h.output_token_ids))
        assert out[row].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_bad_words_need_the_whole_prefix() -> None:
    p = SamplingParams(bad_words_token_ids=((6, 8), (4,), (1, 2, 10)))
    logits = torch.zeros(1, 12)
    masked = [
        [t for t in range(12) if apply_controls(logits, [p], [TokenHistory([], out)], EOS)[0, t] == -math.inf]
        for out in ([], [6], [5, 6], [1, 2], [2])
    ]
    assert masked == [[4], [4, 8], [4, 8], [4, 10], [4]]


def test_rows_without_controls_are_untouched_and_rows_are_independent() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    plain, biased = SamplingParams(), SamplingParams(logit_bias=((3, 5.0),))
    out = apply_controls(logits, [plain, biased], [TokenHistory([1], [2]), TokenHistory([1], [2])], EOS)
    assert torch.equal(out[0], logits[0])
    alone = apply_controls(logits[1:], [biased], [TokenHistory([1], [2])], EOS)
    assert torch.equal(out[1], alone[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3.0}, "frequency_penalty must be in [-2, 2], got -3.0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0, got 0.0"),
        ({"logit_bias": ((1, 101.0),)}, "logit_bias maps token ids >= 0 to biases in [-100, 100]"),
        ({"logit_bias": ((1, 1.0), (1, 2.0))}, "logit_bias must not name a token id twice"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens (5) must be at most max_tokens (4)"),
        ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
        ({"bad_words_token_ids": ((),)}, "bad_words_token_ids must be non-empty sequences of token ids >= 0"),
        ({"prompt_logprobs": 21}, "prompt_logprobs must be None or an integer in [0, 20], got 21"),
    ],
)
def test_sampling_params_reject_out_of_range_controls(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == message


def test_logit_bias_is_sorted_by_token_id() -> None:
    assert SamplingParams(logit_bias=((9, 1.0), (2, -1.0))).logit_bias == ((2, -1.0), (9, 1.0))


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_engine_greedy_tokens_follow_the_formula_on_transformers_logits(name: str, tiny_model_dir: Path) -> None:
    """Every step's greedy token is the argmax of the reference applied to transformers'
    logits of the prefix, in a batch with a plain request and with chunked prefill; the
    reported logprobs are the raw model's."""
    steps = 6
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=64, max_prefill_chunk_tokens=8)
    vocab = engine.model_config.vocab_size
    prompt, other = random_prompts([21, 13], vocab, seed=5)
    base = CONTROLS[name]
    p = SamplingParams(
        max_tokens=steps,
        temperature=0.0,
        logprobs=0,
        ignore_eos=True,
        repetition_penalty=base.repetition_penalty,
        frequency_penalty=base.frequency_penalty,
        presence_penalty=base.presence_penalty,
        logit_bias=base.logit_bias,
        min_tokens=min(base.min_tokens, steps),
        stop_token_ids=base.stop_token_ids,
        bad_words_token_ids=base.bad_words_token_ids,
    )
    out, _ = engine.generate([prompt, other], [p, SamplingParams(max_tokens=steps, temperature=0.0)])
    assert out.logprobs is not None
    output: list[int] = []
    for token, lp in zip(out.token_ids, out.logprobs):
        logits = hf_prompt_logits(tiny_model_dir, prompt + output)[-1]
        expected = reference(logits.tolist(), p, prompt, output)
        assert token == max(range(vocab), key=lambda t: expected[t])
        assert lp.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-4)
        output.append(token)
    engine.check_integrity()
    assert engine.is_drained()
