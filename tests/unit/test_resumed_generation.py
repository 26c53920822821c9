"""A request that arrives with generated tokens (a migration's replay, `Request.num_generated`)
continues exactly as the unbroken run, in one process through the real Engine.

For presence/frequency penalties, bad words and a JSON schema, greedy and seeded: the tokens
after the cut equal the unbroken run's, colocated (`add_request` with `generated_token_ids`)
and disaggregated (a prefill engine hands off prompt + generated tokens, a decode engine
reserves, receives the KV and commits). The old replay (the sent tokens as prompt) is run as a
control: it gives other tokens, so each case checks something the fix changed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from tandem.common.block_hash import block_extra, hash_blocks
from tandem.common.request import StructuredOutput
from tandem.engine import Engine, FinishReason, SamplingParams
from tandem.engine.outputs import RequestOutput
from tandem.engine.tokenizer import Tokenizer
from tests.conftest import random_prompts
from tests.json_schemas import generate_schemas

BLOCK_SIZE = 16
SCHEMA = generate_schemas(seed=3, count=1)[0]


@pytest.fixture
def engines(tiny_model_dir: Path) -> tuple[Engine, Engine, Engine]:
    make = lambda: Engine.from_pretrained(tiny_model_dir, device="cpu", num_blocks=128, max_model_len=512)  # noqa: E731
    return make(), make(), make()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


def _penalties(temperature: float, reference: Callable[[SamplingParams], list[int]]) -> tuple[SamplingParams, int]:
    """A negative presence penalty favours the tokens already generated (the sent ones too)."""
    params = SamplingParams(
        max_tokens=16, temperature=temperature, seed=5, ignore_eos=True, presence_penalty=-2.0, frequency_penalty=1.0
    )
    return params, 7


def _bad_words(temperature: float, reference: Callable[[SamplingParams], list[int]]) -> tuple[SamplingParams, int]:
    """The bad word is the pair that the run without it generates across the cut (positions
    cut - 1 and cut, the first such pair from position 4 on that did not occur before): the
    unbroken run is the same up to the cut, then only a worker that counts the sent tokens as
    output masks the pair's second token."""
    plain = SamplingParams(max_tokens=16, temperature=temperature, seed=5, ignore_eos=True)
    tokens = reference(plain)
    pairs = list(itertools.pairwise(tokens))
    cut = next(c for c in range(4, len(tokens)) if pairs[c - 1] not in pairs[: c - 1])
    params = dataclasses.replace(plain, bad_words_token_ids=(pairs[cut - 1],))
    assert reference(params)[:cut] == tokens[:cut]
    return params, cut


def _json_schema(temperature: float, reference: Callable[[SamplingParams], list[int]]) -> tuple[SamplingParams, int]:
    so = StructuredOutput("json_schema", json.dumps(SCHEMA, sort_keys=True, separators=(",", ":")))
    params = SamplingParams(max_tokens=200, temperature=temperature, seed=5, structured_output=so)
    return params, len(reference(params)) // 2


def _run(engine: Engine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    return tokens


def _hand_off(prefill: Engine, decode: Engine, prompt: list[int], params: SamplingParams, sent: list[int]) -> list[int]:
    """Prefill prompt + sent as a replay, hand the KV to `decode`, decode the rest; returns the
    first token and every later one."""
    prefill.add_request("replay", prompt, params, generated_token_ids=sent, hand_off=True)
    outputs: list[RequestOutput] = []
    while not outputs:  # the first steps may wait for the grammar's compile
        outputs = prefill.step()
    (out,) = outputs
    assert out.finish_reason is FinishReason.HANDOFF
    first = out.new_token_ids[0]
    held = prefill.held["replay"]
    context = prompt + sent  # the whole token list crosses the hand-off, as the wire's prompt
    full = len(context) // BLOCK_SIZE
    assert held.num_tokens == len(context) and len(held.block_ids) == -(-len(context) // BLOCK_SIZE)
    assert held.block_hashes == tuple(hash_blocks(context, BLOCK_SIZE, block_extra(prefill.model_id, None)))[:full]
    if params.structured_output is not None:  # compiled, else `reserve` defers to `add_request`
        decode.grammars.submit(params.structured_output).result()
    res = decode.reserve("replay", prompt, params, first, generated_token_ids=sent)
    # the decode engine's prefix cache may hold an earlier case's blocks of the same tokens
    assert res is not None and res.num_full_blocks == full
    for src, dst in zip(prefill.kv_caches, decode.kv_caches):
        dst[:, list(res.missing_block_ids)] = src[:, list(held.block_ids[res.num_cached_blocks : full])]
    assert prefill.release_held("replay") is True
    decode.commit("replay")
    return [first, *_run(decode)]


@pytest.mark.parametrize("case", [_penalties, _bad_words, _json_schema], ids=["penalties", "bad_words", "json_schema"])
@pytest.mark.parametrize("temperature", [0.0, 0.3], ids=["greedy", "seeded"])
def test_a_replay_with_generated_tokens_continues_the_unbroken_run(
    engines: tuple[Engine, Engine, Engine],
    tokenizer: Tokenizer,
    case: Callable[[float, Callable[[SamplingParams], list[int]]], tuple[SamplingParams, int]],
    temperature: float,
) -> None:
    prefill, decode, single = engines
    (prompt,) = random_prompts([29], single.model_config.vocab_size, seed=12)

    def reference(params: SamplingParams) -> list[int]:
        return list(single.generate([prompt], params)[0].token_ids)

    params, cut = case(temperature, reference)
    unbroken = reference(params)
    sent, rest = unbroken[:cut], unbroken[cut:]
    assert 0 < cut < len(unbroken)
    if params.structured_output is not None:
        assert unbroken[-1] in single.model_config.eos_token_ids
        jsonschema.validate(json.loads(tokenizer.decode(unbroken)), SCHEMA)

    single.add_request("colocated", prompt, params, generated_token_ids=sent)
    assert _run(single) == rest
    assert _hand_off(prefill, decode, prompt, params, sent) == rest

    # the control: the sent tokens replayed as prompt (what migration did before) differ
    old = dataclasses.replace(params, max_tokens=params.max_tokens - cut)
    single.add_request("old-replay", prompt + sent, old)
    assert _run(single) != rest
    for engine in engines:
        engine.check_integrity()
        assert engine.is_drained()
