"""The openai SDK's `chat.completions.parse(response_format=PydanticModel)` end to end, through a
disaggregated cluster (issue 19's first acceptance check), and "required" tool calls that parse
against their schema.

These need the worker side of structured output (the grammar bitmask in the sampler): without
it the random tiny model's text is not JSON. The gateway part (the schema the SDK sends becomes
`StructuredOutput("json_schema", ...)`) is tests/unit/test_gateway_structured.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import jsonschema
import openai
import pydantic
import pytest

from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster

MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


class City(pydantic.BaseModel):
    """Bounded strings and arrays, so that even a random model's constrained output ends."""

    name: Annotated[str, pydantic.Field(max_length=16)]
    population: Annotated[int, pydantic.Field(ge=0, le=10_000_000)]
    coastal: bool
    districts: Annotated[list[Annotated[str, pydantic.Field(max_length=12)]], pydantic.Field(max_length=3)]


@pytest.fixture(scope="module")
def parse_gateway(cluster: Cluster) -> Iterator[ChildProcess]:
    g = cluster.gateway("--local-prefill-max-tokens", "0")
    try:
        yield g
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def client(parse_gateway: ChildProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=parse_gateway.address + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_returns_a_parsed_object(client: openai.OpenAI, tiny_model_dir: Path, temperature: float) -> None:
    resp = client.chat.completions.parse(
        model=tiny_model_dir.name,
        messages=MESSAGES,
        response_format=City,
        max_tokens=400,
        temperature=temperature,
        seed=7,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert choice.message.parsed == City.model_validate_json(choice.message.content or "")


def test_parse_streaming_returns_a_parsed_object(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    with client.chat.completions.stream(
        model=tiny_model_dir.name, messages=MESSAGES, response_format=City, max_tokens=400, temperature=0
    ) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, City)


def test_required_tool_calls_parse_against_their_schema(client: openai.OpenAI, tiny_model_dir: Path) -> None:
    parameters = City.model_json_schema()
    tools = [{"type": "function", "function": {"name": "record_city", "parameters": parameters}}]
    resp = client.chat.completions.create(
        model=tiny_model_dir.name,
        messages=MESSAGES,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=400,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["record_city"]
    jsonschema.validate(pydantic_json(calls[0].function.arguments), parameters)


def pydantic_json(text: str) -> object:
    return pydantic.TypeAdapter(object).validate_json(text)
