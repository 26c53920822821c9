"""Structured output in the engine (issue 19): xgrammar grammars applied as a token bitmask.

In-process through the real Engine on the random tiny model: 100 generated JSON schemas
validate with `jsonschema`, greedy and sampled; regex, choice and EBNF outputs match exactly;
strings never hold raw control characters; bad specs fail alone with a message naming the
problem; a compiling grammar delays no other request; preemption and the prefill/decode
split give the same output as one uninterrupted colocated run.
"""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import jsonschema
import pytest
import torch
import xgrammar as xgr

from tandem.common.request import StructuredOutput
from tandem.engine import Engine, FinishReason, SamplingParams
from tandem.engine.grammar.compiler import GrammarError, grammar_key
from tandem.engine.grammar.matchers import allowed_tokens
from tandem.engine.tokenizer import Tokenizer
from tests.conftest import random_prompts
from tests.json_schemas import generate_schemas


def schema_output(schema: dict) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, device="cpu", num_blocks=2048, max_model_len=512)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_validates_against_its_schema(engine: Engine, tokenizer: Tokenizer, temperature: float) -> None:
    schemas = generate_schemas(seed=0, count=100)
    prompts = random_prompts([4 + i % 9 for i in range(100)], engine.model_config.vocab_size, seed=7)
    params = [
        SamplingParams(max_tokens=400, temperature=temperature, seed=i, structured_output=schema_output(s))
        for i, s in enumerate(schemas)
    ]
    outputs = engine.generate(prompts, params)
    for schema, out in zip(schemas, outputs):
        assert out.finish_reason is FinishReason.STOP
        assert out.token_ids[-1] in engine.model_config.eos_token_ids  # EOS only once complete
        text = tokenizer.decode(out.token_ids)
        jsonschema.validate(json.loads(text), schema)  # json.loads is strict: no control characters
        assert not _whitespace_outside_strings(text), text
    assert engine.is_drained()


def test_the_generated_schemas_cover_the_issue_and_are_seeded() -> None:
    schemas = generate_schemas(seed=0, count=100)
    assert schemas == generate_schemas(seed=0, count=100)
    assert schemas != generate_schemas(seed=1, count=100)
    text = json.dumps(schemas)
    for needle in (
        '"anyOf"',
        '"enum"',
        '"required"',
        '"minItems"',
        '"maxItems"',
        '"pattern"',
        '"minimum"',
        '"maximum"',
    ):
        assert needle in text
    assert any(p.get("type") == "object" for s in schemas for p in s["properties"].values())  # nested
    for schema in schemas:
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize(
    ("so", "pattern"),
    [
        (StructuredOutput("regex", "[a-c]{3}x(y|zz)"), r"[a-c]{3}x(y|zz)"),
        (StructuredOutput("choice", json.dumps(["yes", 'no "way"', "maybe\\n"])), r'yes|no "way"|maybe\\n'),
        (StructuredOutput("grammar", 'root ::= "n=" [1-9] [0-9]{0,3} ";"'), r"n=[1-9][0-9]{0,3};"),
    ],
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_choice_and_grammar_outputs_match_exactly(
    engine: Engine, tokenizer: Tokenizer, so: StructuredOutput, pattern: str, temperature: float
) -> None:
    prompts = random_prompts([5, 9, 13], engine.model_config.vocab_size, seed=3)
    params = SamplingParams(max_tokens=64, temperature=temperature, seed=11, structured_output=so)
    for out in engine.generate(prompts, [params] * 3):
        assert out.finish_reason is FinishReason.STOP
        assert re.fullmatch(pattern, tokenizer.decode(out.token_ids)), tokenizer.decode(out.token_ids)


def test_json_object_is_a_compact_object_and_max_tokens_cuts_it_with_length(
    engine: Engine, tokenizer: Tokenizer
) -> None:
    prompt = random_prompts([6], engine.model_config.vocab_size, seed=5)[0]
    so = StructuredOutput("json_object")
    out = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, structured_output=so))[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 3
    assert tokenizer.decode(out.token_ids).startswith("{")
    assert " " not in tokenizer.decode(out.token_ids)[:2]  # no whitespace after the brace


def test_strings_with_length_bounds_never_allow_control_characters(engine: Engine) -> None:
    """xgrammar's length-bounded strings allow U+0001 raw (invalid JSON); ours do not."""
    schema = json.dumps({"type": "string", "maxLength": 5})
    ours = engine.grammars.submit(StructuredOutput("json_schema", schema)).result()
    raw = xgr.GrammarCompiler(ours.tokenizer_info).compile_json_schema(schema, any_whitespace=False)
    for text, raw_ok, ours_ok in [('"\x01"', True, False), ('"\t"', True, False), ('"ab\x7f"', True, True)]:
        for grammar, expected in ((raw, raw_ok), (ours, ours_ok)):
            matcher = xgr.GrammarMatcher(grammar)
            assert (matcher.accept_string(text) and matcher.is_completed()) is expected, (text, expected)


def _byte_level_char(byte: int) -> str:
    """The character that stands for `byte` in a byte-level BPE vocabulary (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if byte in printable:
        return chr(byte)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(byte))


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_strings_never_allow_an_encoded_surrogate(engine: Engine, kind: str) -> None:
    """Byte-level tokens ED, A4, A5 spell U+D925, which is not UTF-8 (it decodes to three
    U+FFFD, so a 16-character bound would be broken): xgrammar's own string rule takes it, ours
    does not; a valid 3-byte character (E4 B8 AD) still passes."""
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    spec = json.dumps(schema) if kind == "json_schema" else ""
    ours = engine.grammars.submit(StructuredOutput(kind, spec)).result()
    raw = xgr.GrammarCompiler(ours.tokenizer_info).compile_json_schema(
        spec or '{"type": "object"}', any_whitespace=False, separators=(",", ":"), strict_mode=kind == "json_schema"
    )
    backend = Tokenizer.from_pretrained(engine.model_dir).backend
    byte_token = {bytes([b]): backend.token_to_id(_byte_level_char(b)) for b in (0xED, 0xA4, 0xA5, 0xE4, 0xB8, 0xAD)}
    for raw_bytes, raw_ok, ours_ok in [(b"\xed\xa4\xa5", True, False), (b"\xe4\xb8\xad", True, True)]:
        for grammar, expected in ((raw, raw_ok), (ours, ours_ok)):
            matcher = xgr.GrammarMatcher(grammar)
            assert matcher.accept_string('{"s":"')
            accepted = all(matcher.accept_token(byte_token[bytes([b])]) for b in raw_bytes)
            assert (accepted and matcher.accept_string('"}') and matcher.is_completed()) is expected, raw_bytes


@pytest.mark.parametrize(
    ("so", "message"),
    [
        (
            StructuredOutput("json_schema", '{"type": "foo"}'),
            'invalid structured output (json_schema): Unsupported type "foo"',
        ),
        (
            StructuredOutput("json_schema", "{bad"),
            "invalid structured output (json_schema): the JSON schema is not valid JSON: "
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        (
            StructuredOutput("regex", "(a"),
            "invalid structured output (regex): Regex parsing error at position 3: The parenthesis is not closed.",
        ),
        (
            StructuredOutput("choice", '["a", 3]'),
            "invalid structured output (choice): choice must be a non-empty list of non-empty strings",
        ),
        (
            StructuredOutput("grammar", "root ::= foo"),
            'invalid structured output (grammar): EBNF parser error at line 1, column 10: Rule "foo" is not defined',
        ),
    ],
)
def test_a_bad_spec_fails_with_a_message_naming_the_problem(engine: Engine, so: StructuredOutput, message: str) -> None:
    with pytest.raises(GrammarError) as info:
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, structured_output=so))
    assert str(info.value) == message
    # through the step-level API: only that request fails, with the same message
    engine.add_request("good", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=4, structured_output=so))
    while engine.has_unfinished():
        engine.step()
    assert engine.is_drained()


def test_a_compiling_grammar_delays_no_other_request(engine: Engine, tokenizer: Tokenizer) -> None:
    """The compile is held on its pool thread by an event, deterministically: the plain
    request runs to its end meanwhile, and the constrained one holds no block until then."""
    release = threading.Event()
    real_compile = engine.grammars.compile

    def held_compile(so: StructuredOutput) -> object:
        assert release.wait(timeout=60)
        return real_compile(so)

    so = schema_output({"type": "object", "properties": {"held": {"type": "boolean"}}, "required": ["held"]})
    engine.grammars.compile = held_compile  # type: ignore[method-assign]
    try:
        engine.add_request(
            "constrained", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.0, structured_output=so)
        )
        engine.add_request("plain", [4, 5, 6], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        plain: list[int] = []
        while len(plain) < 8:
            for out in engine.step():
                assert out.request_id == "plain"
                plain.extend(out.new_token_ids)
        assert engine.num_requests == 1 and engine.pool.num_used_blocks == 0  # waiting, no blocks
    finally:
        release.set()
        engine.grammars.compile = real_compile  # type: ignore[method-assign]
    constrained: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            constrained.extend(out.new_token_ids)
    assert json.loads(tokenizer.decode(constrained)) in ({"held": True}, {"held": False})
    assert engine.is_drained()


def test_a_failed_compile_after_queueing_ends_only_that_request(engine: Engine) -> None:
    so = StructuredOutput("regex", "(unclosed")
    release = threading.Event()
    real_compile = engine.grammars.compile

    def held_compile(spec: StructuredOutput) -> object:
        assert release.wait(timeout=60)
        return real_compile(spec)

    engine.grammars.compile = held_compile  # type: ignore[method-assign]
    try:
        engine.add_request("bad", [1, 2], SamplingParams(max_tokens=4, structured_output=so))
    finally:
        release.set()
        engine.grammars.compile = real_compile  # type: ignore[method-assign]
    engine.add_request("ok", [1, 2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    finished: dict[str, int] = {}
    while engine.has_unfinished():
        for out in engine.step():
            finished["ok"] = finished.get("ok", 0) + len(out.new_token_ids)
    aborted = engine.take_aborted()
    assert [(o.request_id, o.finish_reason, o.error) for o in aborted] == [
        (
            "bad",
            FinishReason.ABORT,
            "invalid structured output (regex): Regex parsing error at position 10: The parenthesis is not closed.",
        )
    ]
    assert finished == {"ok": 2} and engine.is_drained()


def test_grammars_are_cached_by_a_hash_of_kind_and_spec(engine: Engine) -> None:
    a = StructuredOutput("regex", "abc")
    assert engine.grammars.submit(a) is engine.grammars.submit(StructuredOutput("regex", "abc"))
    assert engine.grammars.submit(a) is not engine.grammars.submit(StructuredOutput("grammar", 'root ::= "abc"'))
    assert (
        grammar_key(a) == grammar_key(StructuredOutput("regex", "abc")) != grammar_key(StructuredOutput("regex", "abd"))
    )


def test_logprobs_are_those_of_the_masked_distribution(engine: Engine) -> None:
    """The choice "a" (one character: one token) forces "a" (logprob 0, no alternative),
    then one of the model's EOS tokens, whose masked probabilities sum to 1."""
    so = StructuredOutput("choice", json.dumps(["a"]))
    params = SamplingParams(max_tokens=20, temperature=0.0, logprobs=3, structured_output=so)
    out = engine.generate([[1, 2, 3]], params)[0]
    assert out.finish_reason is FinishReason.STOP and out.logprobs is not None and len(out.logprobs) == 2
    first, last = out.logprobs
    assert first.logprob == 0.0 and first.top == ((first.token_id, 0.0),)
    eos = engine.model_config.eos_token_ids
    assert len(eos) > 1 and last.token_id in eos and {t for t, _ in last.top} == eos
    assert sum(math.exp(v) for _, v in last.top) == pytest.approx(1.0, abs=1e-6)


def test_preemption_and_the_prefill_decode_split_give_the_colocated_output(tiny_model_dir: Path) -> None:
    schemas = generate_schemas(seed=3, count=6)
    prompts = random_prompts([30, 45, 20, 60, 33, 41], 512, seed=9)
    params = [
        SamplingParams(max_tokens=200, temperature=t, seed=5, structured_output=schema_output(s))
        for s, t in zip(schemas, [0.0, 1.0] * 3)
    ]
    roomy = Engine.from_pretrained(tiny_model_dir, device="cpu", num_blocks=256, max_model_len=512)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    # too few blocks for all six at once: sequences are preempted and recomputed
    tight = Engine.from_pretrained(tiny_model_dir, device="cpu", num_blocks=24, block_size=16, max_model_len=512)
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.stats.num_preemptions > 0
    # prefill engine samples the first token under the grammar, decode engine resumes from it
    prefill = Engine.from_pretrained(tiny_model_dir, device="cpu", num_blocks=256, max_model_len=512)
    decode = Engine.from_pretrained(tiny_model_dir, device="cpu", num_blocks=256, max_model_len=512)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        prefill.add_request(f"r{i}", prompt, p, hand_off=True)
    firsts = {o.request_id: o.new_token_ids[0] for o in _run(prefill)}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        decode.add_request(f"r{i}", prompt, p, generated_token_ids=[firsts[f"r{i}"]])
    tokens = {f"r{i}": [firsts[f"r{i}"]] for i in range(len(prompts))}
    for out in _run(decode):
        tokens[out.request_id].extend(out.new_token_ids)
    assert [tuple(tokens[f"r{i}"]) for i in range(len(prompts))] == expected
    for held in list(prefill.held):
        prefill.release_held(held)
    assert prefill.is_drained() and decode.is_drained()


def _whitespace_outside_strings(text: str) -> bool:
    """True if JSON `text` has whitespace between its tokens (compact JSON has none)."""
    in_string = escaped = False
    for char in text:
        if in_string:
            in_string, escaped = (char != '"' or escaped), (char == "\\" and not escaped)
        elif char == '"':
            in_string = True
        elif char in " \t\r\n":
            return True
    return False


def _run(engine: Engine) -> list:
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_a_request_waiting_for_its_grammar_aborts_and_reserve_defers_to_add_request(engine: Engine) -> None:
    """Aborting a request whose grammar compiles frees nothing it does not hold; a decode
    reservation for such a request is declined (None), so the caller queues it instead."""
    release = threading.Event()
    real_compile = engine.grammars.compile

    def held_compile(so: StructuredOutput) -> object:
        assert release.wait(timeout=60)
        return real_compile(so)

    so = StructuredOutput("regex", "held-[0-9]")
    params = SamplingParams(max_tokens=8, temperature=0.0, structured_output=so)
    engine.grammars.compile = held_compile  # type: ignore[method-assign]
    try:
        engine.add_request("waiting", [1, 2, 3], params)
        assert engine.reserve("reserved", [1, 2, 3], params, first_token=5) is None
        assert engine.abort("waiting") is True
    finally:
        release.set()
        engine.grammars.compile = real_compile  # type: ignore[method-assign]
    assert [(o.request_id, o.finish_reason, o.error) for o in engine.take_aborted()] == [
        ("waiting", FinishReason.ABORT, None)
    ]
    assert not engine.has_unfinished() and engine.is_drained()


def test_the_bitmask_unpacks_token_by_token() -> None:
    """Bit b of word w is token 32 w + b, the sign bit included; columns past `width` drop."""
    bitmask = torch.tensor([[0b101, -(2**31)], [-1, 1]], dtype=torch.int32)
    allowed = allowed_tokens(bitmask, 40)
    assert allowed.shape == (2, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2]  # token 63 is past width 40
    assert allowed[1].nonzero().flatten().tolist() == list(range(33))
    assert allowed_tokens(bitmask, 64)[0].nonzero().flatten().tolist() == [0, 2, 63]
    with pytest.raises(ValueError, match="a bitmask of 2 words covers 64 tokens, not 65"):
        allowed_tokens(bitmask, 65)
