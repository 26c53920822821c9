"""Tool-call parsers (tandem.gateway.tools.parsers) on given model outputs, and their streaming
(tools/stream.py): streamed deltas, however the text is cut, add up to the whole-output parse."""

from __future__ import annotations

import json

import pytest

from tandem.gateway.bodies import ChatCompletionRequest
from tandem.gateway.tools.choice import ToolChoice
from tandem.gateway.tools.parsers import FunctionCall, ParsedOutput, make_parser
from tandem.gateway.tools.stream import ToolCallStream

WEATHER = FunctionCall("get_weather", '{"city": "Paris", "unit": "°C"}')
TIME = FunctionCall("get_time", '{"zone": "CET"}')

CASES = [
    # hermes: Qwen2.5 / Qwen3
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>',
        ParsedOutput(None, (WEATHER,)),
    ),
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        ParsedOutput("Let me check.\n", (WEATHER, TIME)),
    ),
    (  # the last block left unclosed (the model stopped at EOS)
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n',
        ParsedOutput(None, (TIME,)),
    ),
    ("hermes", "No tools needed: 2 < 3.", ParsedOutput("No tools needed: 2 < 3.", ())),
    ("hermes", "<tool_call>\nnot json\n</tool_call>", ParsedOutput("<tool_call>\nnot json\n</tool_call>", ())),
    # llama3_json: Llama 3.1+
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "°C"}}',
        ParsedOutput(None, (WEATHER,)),
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "°C"}}; '
        '{"name": "get_time", "arguments": {"zone": "CET"}}',
        ParsedOutput(None, (WEATHER, TIME)),
    ),
    ("llama3_json", 'It is {"warm": true}.', ParsedOutput('It is {"warm": true}.', ())),
    ("llama3_json", '{"warm": true}', ParsedOutput('{"warm": true}', ())),
    # mistral
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}, '
        '{"name": "get_time", "arguments": {"zone": "CET"}}]',
        ParsedOutput(None, (WEATHER, TIME)),
    ),
    (
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}]',
        ParsedOutput("Sure. ", (TIME,)),
    ),
    ("mistral", "[TOOL_CALLS] oops", ParsedOutput("[TOOL_CALLS] oops", ())),
    ("mistral", "Plain answer.", ParsedOutput("Plain answer.", ())),
]


@pytest.mark.parametrize(("parser", "text", "expected"), CASES)
def test_parse(parser: str, text: str, expected: ParsedOutput) -> None:
    assert make_parser(parser).parse(text) == expected


def auto_choice(parser: str) -> ToolChoice:
    tools = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time")]
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": tools})
    choice = ToolChoice.of(body, parser)
    assert choice is not None
    return choice


def replay(choice: ToolChoice, pieces: list[str]) -> tuple[str, list[dict], list[dict]]:
    """Stream `pieces`; the content, the raw deltas, and the calls the deltas add up to."""
    stream = ToolCallStream(choice)
    content, deltas = "", []
    for piece in pieces:
        out = stream.push(piece)
        content, deltas = content + out.content, deltas + out.tool_calls
    end = stream.finish()
    content, deltas = content + end.content, deltas + end.tool_calls
    calls: list[dict] = []
    for delta in deltas:
        if "id" in delta:  # a call's head: index, id, type, name, empty arguments
            assert delta["index"] == len(calls)
            assert delta["type"] == "function" and delta["function"]["arguments"] == ""
            calls.append({"name": delta["function"]["name"], "arguments": ""})
        else:
            assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
            calls[delta["index"]]["arguments"] += delta["function"]["arguments"]
    return content, deltas, calls


@pytest.mark.parametrize(("parser", "text", "expected"), CASES)
@pytest.mark.parametrize("piece_size", [1, 3, 1000])
def test_streaming_adds_up_to_the_parse(parser: str, text: str, expected: ParsedOutput, piece_size: int) -> None:
    pieces = [text[i : i + piece_size] for i in range(0, len(text), piece_size)]
    content, _, calls = replay(auto_choice(parser), pieces)
    assert content == (expected.content or "")
    assert calls == [{"name": c.name, "arguments": c.arguments} for c in expected.calls]


def test_hermes_stream_sends_content_at_once_and_each_call_when_it_closes() -> None:
    stream = ToolCallStream(auto_choice("hermes"))
    assert stream.push("Let me <").content == "Let me "  # "<" may open <tool_call>: held
    assert stream.push("b>").content == "<b>"
    out = stream.push('<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}')
    assert (out.content, out.tool_calls) == ("", [])  # not closed yet
    out = stream.push("</tool_call>")
    assert out.tool_calls[0]["function"] == {"name": "get_time", "arguments": ""}
    assert out.tool_calls[0]["id"].startswith("call_") and len(out.tool_calls[0]["id"]) == 29
    assert out.tool_calls[1] == {"index": 0, "function": {"arguments": '{"zone": "CET"}'}}
    assert stream.finish().tool_calls == []
    assert stream.called


def test_mistral_ids_are_nine_alphanumerics() -> None:
    _, deltas, _ = replay(auto_choice("mistral"), ['[TOOL_CALLS][{"name": "get_time", "arguments": {}}]'])
    assert len(deltas[0]["id"]) == 9 and deltas[0]["id"].isalnum()


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown tool call parser 'qwen'; choose one of hermes, llama3_json, mistral"):
        make_parser("qwen")


def test_arguments_are_json_text_of_the_arguments_object() -> None:
    call = make_parser("hermes").parse('<tool_call>{"name": "f", "arguments": {"a": [1, {"b": null}]}}</tool_call>')
    assert json.loads(call.calls[0].arguments) == {"a": [1, {"b": None}]}
