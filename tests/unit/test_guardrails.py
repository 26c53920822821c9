"""Guardrail hooks: the spec, entry-point loading, the built-ins, the output window, the input
verdicts, and one choice's stream through `Generation` with the real tokenizer."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from tandem.common.request import FinishReason, Request, SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway import protocol
from tandem.gateway.config import GatewayConfig
from tandem.gateway.errors import OpenAIError
from tandem.gateway.generation import ChoiceSpec, Generation
from tandem.gateway.guardrails import (
    ALLOW,
    GuardInput,
    Guardrails,
    InputVerdict,
    OutputWindow,
    Released,
    Rewrite,
    guard_input,
    load_guardrails,
    parse_guardrails,
)
from tandem.gateway.guardrails.blocklist import Blocklist
from tandem.gateway.guardrails.redactor import RegexRedactor
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.pipeline import Delta
from tandem.gateway.serving import _guard


def push_all(window: OutputWindow, pieces: Sequence[str]) -> list[tuple[str, str | None]]:
    return [(r.text, r.stopped_by) for r in (window.push(p, i == len(pieces) - 1) for i, p in enumerate(pieces))]


# ---- the spec ------------------------------------------------------------------------------


def test_spec_is_parsed_in_order_with_json_options_holding_commas() -> None:
    specs = parse_guardrails('regex_redactor:{"patterns": {"a": "x,y"}}, blocklist:{"words": ["p, q"]},other')
    assert [(s.name, dict(s.options)) for s in specs] == [
        ("regex_redactor", {"patterns": {"a": "x,y"}}),
        ("blocklist", {"words": ["p, q"]}),
        ("other", {}),
    ]
    assert parse_guardrails("") == ()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("blocklist:{nope", "--guardrails: the options of 'blocklist' are not valid JSON: Expecting property name"),
        ('blocklist:["a"]', "--guardrails: the options of 'blocklist' must be a JSON object, got ['a']"),
        ("a,,b", "--guardrails: expected a guardrail name at character 2, got ''"),
        ("a:{} b", "--guardrails: expected ',' after 'a' at character 5, got 'b'"),
        ("a,a", "--guardrails: a guardrail is named twice in 'a,a'"),
    ],
)
def test_bad_specs_are_refused_with_the_place(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_guardrails(spec)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "nope",
            "unknown guardrail 'nope' in --guardrails; installed (tandem.guardrails entry points): "
            "blocklist, regex_redactor",
        ),
        (
            "blocklist",
            'guardrail \'blocklist\': words must be a non-empty list of non-empty strings, e.g. {"words": ["secret"]}',
        ),
        (
            'regex_redactor:{"patterns": {"bad": "("}}',
            "guardrail 'regex_redactor': pattern 'bad' is not a valid regex: missing ), unterminated subpattern "
            "at position 0",
        ),
        (
            'regex_redactor:{"colour": 1}',
            "guardrail 'regex_redactor': unknown options ['colour']; valid: apply_to, defaults, patterns, replacement",
        ),
    ],
)
def test_the_gateway_config_refuses_to_start_on_a_bad_guardrail(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        GatewayConfig(Path("m"), "redis://127.0.0.1:1", guardrails=spec)
    assert str(info.value) == message


def test_the_builtins_load_by_entry_point_in_spec_order() -> None:
    guardrails = load_guardrails('blocklist:{"words": ["x"]},regex_redactor', 32)
    assert guardrails.names == ("blocklist", "regex_redactor")
    assert [type(h) for h in guardrails.input_hooks] == [Blocklist, RegexRedactor]
    assert [type(h) for h in guardrails.output_hooks] == [Blocklist, RegexRedactor]
    assert load_guardrails("", 32).output_window() is None  # no hooks: no window


def test_a_third_party_guardrail_loads_from_its_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shout_guard.py").write_text(
        "from tandem.gateway.guardrails import ALLOW, Rewrite\n"
        "class Shout:\n"
        "    name = 'shout'\n"
        "    def __init__(self, options):\n"
        "        self.suffix = options.get('suffix', '!')\n"
        "    def check_input(self, request):\n"
        "        return Rewrite(request.map_texts(lambda t: t.upper() + self.suffix))\n"
        "class NotAHook:\n"
        "    def __init__(self, options):\n"
        "        pass\n"
    )
    dist = tmp_path / "shout_guard-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-guard\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[tandem.guardrails]\nshout = shout_guard:Shout\nbroken = shout_guard:NotAHook\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shout_guard", raising=False)
    guardrails = load_guardrails('shout:{"suffix": "?"}', 8)
    assert guardrails.names == ("shout",) and guardrails.output_hooks == ()
    assert guardrails.check_input(GuardInput(None, "hi", {})) == GuardInput(None, "HI?", {})
    with pytest.raises(ValueError) as info:
        load_guardrails("broken", 8)
    assert str(info.value) == "guardrail 'broken' (shout_guard:NotAHook) has neither check_input nor scan_output"


# ---- the output window ----------------------------------------------------------------------


def test_an_email_split_over_two_deltas_is_redacted() -> None:
    window = OutputWindow([RegexRedactor({})], 16)
    assert push_all(window, ["mail bob@exa", "mple.com now"]) == [("", None), ("mail [REDACTED] now", None)]


def test_text_is_held_back_only_as_far_as_the_window() -> None:
    window = OutputWindow([RegexRedactor({})], 8)
    text = "write to ann@x.org or call"
    released = []
    for i, char in enumerate(text):
        out = window.push(char, i == len(text) - 1)
        released.append(out.text)
        # the held characters never exceed the window (a redaction releases past its end)
        assert window.held_chars <= 8
    assert "".join(released) == "write to [REDACTED] or call"
    # the first character goes out as soon as 8 characters follow it
    assert released[:10] == ["", "", "", "", "", "", "", "", "w", "r"]


def test_a_span_longer_than_the_window_is_released_in_part() -> None:
    window = OutputWindow([RegexRedactor({})], 4)
    out = "".join(text for text, _ in push_all(window, list("mail bobby@example.com")))
    assert out == "mail bobby@example.com"  # the window (4) never held a whole address


def test_a_card_number_across_deltas_is_redacted_and_a_named_replacement_is_used() -> None:
    hook = RegexRedactor({"replacement": "<{name}>", "patterns": {"ssn": r"\d{3}-\d{2}-\d{4}"}})
    window = OutputWindow([hook], 24)
    pieces = ["card 4111 11", "11 1111 1111 ok, ssn 123-", "45-6789."]
    assert "".join(t for t, _ in push_all(window, pieces)) == "card <card> ok, ssn <ssn>."


def test_a_blocked_word_stops_before_it_and_ends_the_window() -> None:
    window = OutputWindow([Blocklist({"words": ["secret"]})], 8)
    out = [window.push(c, False) for c in "a secret plan"]
    assert [r.text for r in out] == ["", "", "", "", "", "", "", "", "a", " ", "", "", ""]
    # 'secret' starts at 2: the stop is decided once the cut (length - 8) passes it, at the 11th character
    assert [r.stopped_by for r in out] == [None] * 10 + ["blocklist"] * 3
    assert window.push("more", True) == Released("", "blocklist")  # stopped: nothing more is released


def test_a_blocked_word_is_a_whole_word_only() -> None:
    window = OutputWindow([Blocklist({"words": ["Secret"]})], 8)
    assert push_all(window, ["the secretary's ", "SECRETS"]) == [("the secr", None), ("etary's SECRETS", None)]


def test_redaction_and_stop_together() -> None:
    window = OutputWindow([RegexRedactor({}), Blocklist({"words": ["stop here"]})], 16)
    assert push_all(window, ["ask a@b.io then stop", " here and go"]) == [
        ("ask ", None),  # the address starts at the cut: held until it is decided
        ("[REDACTED] then ", "blocklist"),
    ]


# ---- input hooks ----------------------------------------------------------------------------


class _Tag:
    name = "tag"

    def check_input(self, request: GuardInput) -> InputVerdict:
        return Rewrite(GuardInput(request.messages, request.prompt, {**request.params, "max_tokens": 2}))


class _Never:
    name = "never"

    def check_input(self, request: GuardInput) -> InputVerdict:
        raise AssertionError("a hook after a rejection must not run")


def test_input_allow_rewrite_and_reject() -> None:
    request = GuardInput(({"role": "user", "content": "hi bob@example.com"},), None, {"max_tokens": 4})
    assert Guardrails([Blocklist({"words": ["nope"]})], 8).check_input(request) is None  # allowed
    redact = RegexRedactor({"apply_to": ["input"]})
    assert redact.check_input(GuardInput(None, "nothing here", {})) is ALLOW
    rewritten = Guardrails([redact, _Tag()], 8).check_input(request)
    assert rewritten == GuardInput(({"role": "user", "content": "hi [REDACTED]"},), None, {"max_tokens": 2})
    with pytest.raises(OpenAIError) as info:
        Guardrails([Blocklist({"words": ["HI"]}), _Never()], 8).check_input(request)
    assert info.value.status_code == 400
    assert info.value.body() == {
        "error": {
            "message": "Request rejected by guardrail 'blocklist': the prompt contains a blocked word.",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_policy_violation",
        }
    }


def test_texts_cover_message_parts_and_prompt_lists() -> None:
    chat = GuardInput(
        ({"role": "system", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]}), None, {}
    )
    assert list(chat.texts()) == ["a", "b"]
    assert list(GuardInput(None, ["c", [1, 2]], {}).texts()) == ["c"]
    assert list(GuardInput(None, [1, 2], {}).texts()) == []


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> protocol.ServedModel:
    return protocol.ServedModel("tiny", Tokenizer.from_pretrained(tiny_model_dir), 512, 256, 4)


def test_a_rewritten_request_is_prepared_again(served: protocol.ServedModel) -> None:
    body = {"model": "tiny", "prompt": "mail bob@example.com now", "max_tokens": 3, "temperature": 0}
    prepared = protocol.prepare(json.dumps(body).encode(), False, served)
    assert guard_input(prepared.body) == GuardInput(
        None, "mail bob@example.com now", {k: body[k] for k in body if k != "prompt"}
    )
    state = SimpleNamespace(guardrails=load_guardrails('regex_redactor:{"apply_to": ["input"]}', 8), served=served)
    guarded = _guard(state, prepared, False)  # type: ignore[arg-type]
    expected = protocol.prepare(json.dumps({**body, "prompt": "mail [REDACTED] now"}).encode(), False, served)
    assert guarded.prompts == expected.prompts != prepared.prompts
    assert guarded.choices == expected.choices
    allowed = SimpleNamespace(guardrails=load_guardrails('blocklist:{"words": ["x"]}', 8), served=served)
    assert _guard(allowed, prepared, False) is prepared  # type: ignore[arg-type]


def test_token_ids_and_logprobs_are_refused_with_output_guardrails(served: protocol.ServedModel) -> None:
    state = SimpleNamespace(guardrails=load_guardrails("regex_redactor", 8), served=served)
    for extra, param in (({"logprobs": 1}, "logprobs"), ({"return_token_ids": True}, "return_token_ids")):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, **extra}
        prepared = protocol.prepare(json.dumps(body).encode(), False, served)
        with pytest.raises(OpenAIError) as info:
            _guard(state, prepared, False)  # type: ignore[arg-type]
        assert (info.value.status_code, info.value.param) == (400, param)
        assert info.value.message == f"{param} is not available with output guardrails (regex_redactor) configured."


# ---- one choice through Generation ------------------------------------------------------------


class _TextPipeline:
    """Streams the tokens of `text`, one per delta, the last with finish LENGTH."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.sent = 0
        self.closed = False

    async def generate(self, request: Request, parent: object = None, session: object = None) -> AsyncIterator[Delta]:
        try:
            for i, token in enumerate(self.token_ids):
                self.sent += 1
                last = i == len(self.token_ids) - 1
                yield Delta((token,), (), FinishReason.LENGTH if last else None)
        finally:
            self.closed = True


def _run(
    tokenizer: Tokenizer, text: str, guardrails: Guardrails
) -> tuple[list[tuple[str, str | None]], Generation, _TextPipeline]:
    pipeline = _TextPipeline(tokenizer.encode(text, add_special_tokens=False))
    spec = ChoiceSpec(0, (5, 6), SamplingParams(max_tokens=64, temperature=0.0))
    generation = Generation(
        pipeline,  # type: ignore[arg-type]
        tokenizer,
        GatewayMetrics("m"),
        "cmpl-g",
        [spec],
        (),
        None,
        None,
        guardrails=guardrails,
    )

    async def drain() -> list[tuple[str, str | None]]:
        return [(e.text, e.finish_reason) async for e in generation.events()]

    return asyncio.run(drain()), generation, pipeline


def test_a_stream_is_redacted_across_token_deltas(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    events, generation, _ = _run(tokenizer, "mail bob@example.com now", load_guardrails("regex_redactor", 16))
    assert "".join(text for text, _ in events) == "mail [REDACTED] now"
    assert events[-1][1] == "length"
    assert all("@" not in text for text, _ in events)
    assert len(generation.totals[0].token_ids) == 18  # usage: every generated token


def test_a_blocked_word_ends_the_stream_with_content_filter(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    guardrails = load_guardrails('blocklist:{"words": ["secret"]}', 8)
    text = "a secret plan that goes on and on"
    events, generation, pipeline = _run(tokenizer, text, guardrails)
    assert "".join(t for t, _ in events) == "a "
    assert events[-1][1] == "content_filter" and generation.totals[0].finish_reason == "content_filter"
    # tokens 'a',' se','c','re','t',' p','lan': the 7th makes 'secret' start before the cut
    assert pipeline.sent == 7 and pipeline.closed
    assert len(generation.totals[0].token_ids) == 7  # usage counts what was generated
    assert "".join(generation.totals[0].text) == "a "


def test_no_guardrails_release_each_delta_at_once(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    events, _, _ = _run(tokenizer, "mail bob@example.com now", load_guardrails("", 8))
    assert events[:5] == [("m", None), ("a", None), ("i", None), ("l", None), (" b", None)]
    assert "".join(t for t, _ in events) == "mail bob@example.com now"
