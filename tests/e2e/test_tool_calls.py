"""Tool calling through a real cluster (disaggregated: 2 prefill, 2 decode workers) with the
official `openai` client, on a gateway run with `--tool-call-parser hermes`.

The random tiny model never writes a tool call by itself, so "auto" is checked for what it must
do then (the text is the engine's, as content, and no calls), and a named function for the
shape of the calls the SDK reads, streaming and not (the arguments are the generated text;
once the worker enforces the constraint they also parse against the schema). The parsers
themselves, on known outputs, are tests/unit/test_tool_parsers.py and test_gateway_tool_calls.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tandem.engine import Engine, SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def tool_gateway(cluster: Cluster) -> Iterator[ChildProcess]:
    g = cluster.gateway("--local-prefill-max-tokens", "0", "--tool-call-parser", "hermes")
    try:
        yield g
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def client(tool_gateway: ChildProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_gateway.address + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_auto_without_a_call_is_the_engines_text(client: openai.OpenAI, tiny_model_dir: Path, cluster: Cluster) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    # The tiny model's template does not render tools, so the prompt is the plain chat's.
    prompt = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, True, TOOLS), add_special_tokens=False)
    out = Engine.from_pretrained(tiny_model_dir, num_blocks=64).generate([prompt], SamplingParams(12, 0.0))[0]
    text = tokenizer.decode(list(out.token_ids), skip_special_tokens=True)
    assert "<tool_call>" not in text
    resp = client.chat.completions.create(
        model=tiny_model_dir.name, messages=MESSAGES, tools=TOOLS, max_tokens=12, temperature=0
    )
    assert (resp.choices[0].message.content, resp.choices[0].message.tool_calls) == (text, None)
    assert resp.choices[0].finish_reason == ("length" if len(out.token_ids) == 12 else "stop")
    stream = client.chat.completions.create(
        model=tiny_model_dir.name,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert all(c.choices[0].delta.tool_calls is None for c in chunks)
    cluster.assert_drained()


def test_named_function_calls_read_by_the_sdk(client: openai.OpenAI, tiny_model_dir: Path, cluster: Cluster) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = client.chat.completions.create(
        model=tiny_model_dir.name, messages=MESSAGES, tools=TOOLS, tool_choice=named, max_tokens=16, temperature=0
    )
    choice = resp.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert (calls[0].type, calls[0].function.name) == ("function", "get_weather")
    assert calls[0].id.startswith("call_")
    stream = client.chat.completions.create(
        model=tiny_model_dir.name,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=named,
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    deltas = [c.choices[0].delta.tool_calls[0] for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert (deltas[0].index, deltas[0].function.name, deltas[0].function.arguments) == (0, "get_weather", "")
    assert deltas[0].id is not None and all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == calls[0].function.arguments
    if choice.finish_reason == "tool_calls":  # the constraint held (the worker enforces it)
        assert set(json.loads(calls[0].function.arguments)) == {"city"}
    cluster.assert_drained()


def test_tool_choice_errors_are_400s(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=tiny_model_dir.name,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert info.value.body == {
        "message": "Tool 'nope' has not been passed in `tools`.",
        "type": "invalid_request_error",
        "param": "tool_choice",
        "code": None,
    }
