"""Structured output at the gateway: each way a body asks for it becomes one exact
`StructuredOutput` on every choice's `SamplingParams`, and each bad request is a 400 naming the
parameter (tandem.gateway.structured, through protocol.prepare)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tandem.common.request import StructuredOutput
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway import protocol
from tandem.gateway.errors import OpenAIError
from tandem.gateway.protocol import ServedModel

USER = [{"role": "user", "content": "hi"}]
# Property order is kept (a grammar engine generates properties in schema order).
SCHEMA = {
    "type": "object",
    "properties": {"zeta": {"type": "integer", "minimum": 0}, "alpha": {"type": "string", "pattern": "^[a-z]+$"}},
    "required": ["zeta", "alpha"],
}
SCHEMA_TEXT = (
    '{"type":"object","properties":{"zeta":{"type":"integer","minimum":0},'
    '"alpha":{"type":"string","pattern":"^[a-z]+$"}},"required":["zeta","alpha"]}'
)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> ServedModel:
    return ServedModel("tiny", Tokenizer.from_pretrained(tiny_model_dir), vocab_size=512, max_model_len=64, max_n=4)


def constraint(served: ServedModel, chat: bool = True, **fields: Any) -> list[StructuredOutput | None]:
    base: dict[str, Any] = {"messages": USER} if chat else {"prompt": "hi"}
    prepared = protocol.prepare(json.dumps({**base, "max_tokens": 4, **fields}).encode(), chat, served)
    return [c.sampling.structured_output for c in prepared.choices]


def refusal(served: ServedModel, **fields: Any) -> tuple[int, str | None, str]:
    with pytest.raises(OpenAIError) as info:
        constraint(served, **fields)
    return info.value.status_code, info.value.param, info.value.message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object", "")),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutput("json_schema", SCHEMA_TEXT),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput("json_schema", SCHEMA_TEXT)),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutput("json_schema", SCHEMA_TEXT)),
        ({"structured_outputs": {"regex": "[0-9]{3}"}}, StructuredOutput("regex", "[0-9]{3}")),
        ({"structured_outputs": {"choice": ["yes", "nö"]}}, StructuredOutput("choice", '["yes","nö"]')),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, StructuredOutput("grammar", 'root ::= "a"')),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object", "")),
        ({"guided_json": SCHEMA}, StructuredOutput("json_schema", SCHEMA_TEXT)),
        ({"guided_regex": "a+"}, StructuredOutput("regex", "a+")),
        ({"guided_choice": ["a", "b"]}, StructuredOutput("choice", '["a","b"]')),
        ({"guided_grammar": 'root ::= "b"'}, StructuredOutput("grammar", 'root ::= "b"')),
    ],
)
def test_each_source_becomes_one_exact_structured_output(served: ServedModel, fields: dict, expected) -> None:
    assert constraint(served, n=2, **fields) == [expected, expected]


def test_completions_take_structured_output_too(served: ServedModel) -> None:
    assert constraint(served, chat=False, structured_outputs={"regex": "x"}) == [StructuredOutput("regex", "x")]
    assert constraint(served, chat=False, response_format={"type": "json_object"}) == [
        StructuredOutput("json_object", "")
    ]


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
            "response_format.json_schema.schema",
            "response_format.json_schema.schema is not a valid JSON schema: at '.type': 'objekt' is not valid under "
            "any of the given schemas.",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "3"}}}},
            "response_format.json_schema.schema",
            "response_format.json_schema.schema is not a valid JSON schema: at '.minimum': '3' is not of type "
            "'number'.",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            'response_format of type "json_schema" needs json_schema.schema.',
        ),
        (
            {"structured_outputs": {"json": {"$ref": "https://example.com/s.json"}}},
            "structured_outputs.json",
            "structured_outputs.json has the remote $ref 'https://example.com/s.json'; only local references "
            "('#...') are supported.",
        ),
        (
            {"structured_outputs": {"json": "{not json"}},
            "structured_outputs.json",
            "structured_outputs.json is not valid JSON: Expecting property name enclosed in double quotes: line 1 "
            "column 2 (char 1).",
        ),
        ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json", "must be a JSON schema object."),
        (
            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
            "structured_outputs",
            "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; got 2.",
        ),
        (
            {"structured_outputs": {}},
            "structured_outputs",
            "structured_outputs must set exactly one of json, regex, choice, grammar, json_object; got 0.",
        ),
        (
            {"structured_outputs": {"choice": []}},
            "structured_outputs.choice",
            "structured_outputs.choice must be a non-empty list of strings.",
        ),
        ({"guided_regex": ""}, "guided_regex", "guided_regex must be a non-empty string."),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
            "Use only one of response_format and guided_regex to constrain the output.",
        ),
        (
            {"response_format": {"type": "structural_tag"}},
            "response_format.type",
            "Invalid value for 'response_format.type': Input should be 'text', 'json_object' or 'json_schema'.",
        ),
    ],
)
def test_bad_constraints_are_400s_naming_the_parameter(served: ServedModel, fields: dict, param, message) -> None:
    status, got_param, got_message = refusal(served, **fields)
    assert (status, got_param) == (400, param)
    assert message in got_message
