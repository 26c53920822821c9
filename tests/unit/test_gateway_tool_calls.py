"""Tool calling at the gateway: tool_choice → template tools and constraints (exact schemas,
exact 400s), the chat template's tools and tool-call history against transformers, and the
response bodies and SSE chunks of known token ids read back by the openai SDK's own types."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tandem.common.request import StructuredOutput
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway import protocol
from tandem.gateway.detokenize import IncrementalDetokenizer
from tandem.gateway.errors import OpenAIError
from tandem.gateway.generation import ChoiceEvent, ChoiceTotals
from tandem.gateway.protocol import ServedModel
from tandem.gateway.response_view import ResponseView

transformers = pytest.importorskip("transformers")

USER = [{"role": "user", "content": "Weather in Paris?"}]
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "get_time"}},
]
# A hermes-style (Qwen2.5) template: tools in the system turn, tool calls and tool results in history.
HERMES_TEMPLATE = """{{ bos_token }}
{%- if tools %}<|im_start|>system
# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls is defined %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def hermes_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("hermes") / "model"
    shutil.copytree(tiny_model_dir, target)
    (target / "chat_template.jinja").write_text(HERMES_TEMPLATE, encoding="utf-8")
    return target


def served_model(model_dir: Path, parser: str | None) -> ServedModel:
    tokenizer = Tokenizer.from_pretrained(model_dir)
    return ServedModel("tiny", tokenizer, vocab_size=512, max_model_len=4096, max_n=4, tool_call_parser=parser)


@pytest.fixture(scope="module")
def served(hermes_dir: Path) -> ServedModel:
    return served_model(hermes_dir, "hermes")


def prepare(served: ServedModel, **fields: Any) -> protocol.PreparedRequest:
    raw = json.dumps({"messages": USER, "max_tokens": 8, "tools": TOOLS, **fields}).encode()
    return protocol.prepare(raw, True, served)


def refusal(served: ServedModel, **fields: Any) -> tuple[int, str | None, str]:
    with pytest.raises(OpenAIError) as info:
        prepare(served, **fields)
    return info.value.status_code, info.value.param, info.value.message


def branch(name: str, parameters: dict) -> dict:
    return {
        "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
        "required": ["name", "parameters"],
    }


def test_required_is_enforced_by_vllms_array_schema(served: ServedModel) -> None:
    empty = {"type": "object", "properties": {}}
    items = {"type": "object", "anyOf": [branch("get_weather", PARAMS), branch("get_time", empty)]}
    for parallel, extra in ((None, {}), (True, {}), (False, {"maxItems": 1})):
        prepared = prepare(served, tool_choice="required", parallel_tool_calls=parallel)
        schema = {"type": "array", "minItems": 1, "items": items, **extra}
        expected = StructuredOutput("json_schema", json.dumps(schema, separators=(",", ":")))
        assert [c.sampling.structured_output for c in prepared.choices] == [expected]


def test_required_hoists_defs_to_the_root(served: ServedModel) -> None:
    params = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    spec = prepare(served, tools=tools, tool_choice="required").choices[0].sampling.structured_output
    assert spec is not None and json.loads(spec.spec) == {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [branch("f", {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}})],
        },
        "$defs": {"P": {"type": "integer"}},
    }


def test_named_function_is_enforced_by_its_parameters_schema(served: ServedModel) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert prepare(served, tool_choice=named).choices[0].sampling.structured_output == StructuredOutput(
        "json_schema", json.dumps(PARAMS, separators=(",", ":"))
    )
    named = {"type": "function", "function": {"name": "get_time"}}
    assert prepare(served, tool_choice=named).choices[0].sampling.structured_output == StructuredOutput(
        "json_schema", '{"type":"object","properties":{}}'
    )


def test_auto_and_none_do_not_constrain(served: ServedModel) -> None:
    for choice in (None, "auto", "none"):
        assert prepare(served, tool_choice=choice).choices[0].sampling.structured_output is None


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "Tool 'nope' has not been passed in `tools`.",
        ),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "tool_choice 'required' needs tools."),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            'tool_choice "required" or a named function constrains the output itself; it cannot be combined with '
            "response_format or structured outputs.",
        ),
        (
            {
                "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
            },
            "tools",
            "tools is not a valid JSON schema",
        ),
    ],
)
def test_tool_choice_refusals(served: ServedModel, fields: dict, param: str, message: str) -> None:
    status, got_param, got_message = refusal(served, **fields)
    assert (status, got_param) == (400, param)
    assert message in got_message


def test_auto_needs_a_parser(hermes_dir: Path) -> None:
    status, param, message = refusal(served_model(hermes_dir, None))
    assert (status, param) == (400, "tool_choice")
    assert message.startswith('"auto" tool choice requires the gateway to run with --tool-call-parser')


def test_template_renders_tools_and_tool_call_history_as_transformers(served: ServedModel, hermes_dir: Path) -> None:
    history = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    theirs = transformers.AutoTokenizer.from_pretrained(str(hermes_dir), local_files_only=True)
    # transformers takes tool-call arguments as a dict; OpenAI clients send JSON text.
    as_dicts = [
        *history[:1],
        {
            **history[1],
            "tool_calls": [
                {**history[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        history[2],
    ]
    expected = theirs.apply_chat_template(as_dicts, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in expected
    assert '"name": "get_time"' in expected
    prepared = prepare(served, messages=history)
    assert list(prepared.prompts[0]) == served.tokenizer.encode(expected, add_special_tokens=False)
    # tool_choice "none" leaves the tools out of the template, as vLLM.
    without = theirs.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=False)
    prepared = prepare(served, messages=history, tool_choice="none")
    assert list(prepared.prompts[0]) == served.tokenizer.encode(without, add_special_tokens=False)


OUTPUTS = {
    "hermes": 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
}


def events_of(tokenizer: Tokenizer, text: str, skip_special_tokens: bool) -> list[ChoiceEvent]:
    """The events a generation of `text`'s token ids yields, one token each, finishing with "stop"."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, (1, 2), skip_special_tokens)
    events = [ChoiceEvent(0, detok.push((t,)), (t,), ()) for t in ids]
    last = events[-1]
    events[-1] = ChoiceEvent(0, last.text + detok.flush(), last.token_ids, (), "stop")
    return events


@pytest.mark.parametrize("parser", list(OUTPUTS))
def test_tool_calls_read_back_by_the_sdk(hermes_dir: Path, parser: str) -> None:
    served = served_model(hermes_dir, parser)
    prepared = prepare(served)
    events = events_of(served.tokenizer, OUTPUTS[parser], prepared.skip_special_tokens)
    assert "".join(e.text for e in events) == OUTPUTS[parser]  # the tiny tokenizer round-trips it

    def view() -> ResponseView:
        return ResponseView(
            "chatcmpl-1", 1, "tiny", True, prepared.prompts, 1, None, None, served.tokenizer, prepared.tool_choice
        )

    totals = ChoiceTotals(text=[e.text for e in events], token_ids=[t for e in events for t in e.token_ids])
    totals.finish_reason = "stop"
    whole = ChatCompletion.model_validate(view().full_response({0: totals}))
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert message.content == ("Checking." if parser == "hermes" else None)
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function",
        "get_weather",
        {"city": "Paris"},
    )

    streaming = view()
    state: ChatCompletionStreamState = ChatCompletionStreamState()
    chunks = []
    for event in events:
        for raw in streaming.stream_chunks(event):
            chunk = ChatCompletionChunk.model_validate_json(raw.removeprefix(b"data: ").strip())
            chunks.append(chunk)
            state.handle_chunk(chunk)
    streamed = state.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert (streamed.message.content or None) == message.content  # the role chunk opens content with ""
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []] == [
        ("get_weather", call.function.arguments)
    ]
    heads = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert heads[0].choices[0].delta.tool_calls[0].function.name == "get_weather"  # id and name first
    assert heads[0].choices[0].delta.tool_calls[0].id is not None
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_gateway_config_checks_the_parser_name(tmp_path: Path) -> None:
    from tandem.gateway.config import GatewayConfig

    assert GatewayConfig(tmp_path, "redis://x", tool_call_parser="mistral").tool_call_parser == "mistral"
    with pytest.raises(ValueError, match="tool_call_parser must be one of hermes, llama3_json, mistral, got 'qwen'"):
        GatewayConfig(tmp_path, "redis://x", tool_call_parser="qwen")
