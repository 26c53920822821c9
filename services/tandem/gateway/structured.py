"""Structured output at the gateway: what a body asks for, as one `StructuredOutput`.

A request constrains its output through at most one of:
    1. `response_format` (OpenAI): {"type": "text"} (no constraint), {"type": "json_object"}, or
       {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}};
    2. `structured_outputs` (vLLM): exactly one of {"json": schema}, {"regex": str},
       {"choice": [str, ...]}, {"grammar": EBNF str}, {"json_object": true};
    3. vLLM's older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
    4. `tool_choice` "required" or a named function (`tools.choice.ToolChoice.schema`).

The gateway checks what it can without a grammar engine (it must not import one: see
tests/unit/test_layering.py): a JSON schema must be an object that its meta-schema accepts
(the `jsonschema` library's `check_schema`), with no remote `$ref` (nothing is fetched); choices
a non-empty list of strings; regexes and grammars non-empty strings. What only the grammar
engine can judge (an unsupported keyword, a regex or EBNF that does not compile) is refused by
the worker with gRPC INVALID_ARGUMENT, which `pipeline._rpc_error` turns into a 400 carrying the
worker's message. Every refusal here is a 400 naming the parameter.

The schema travels as compact JSON text with its keys in the client's order: property order
is the order a grammar engine generates the properties in, so it must not be sorted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import jsonschema.exceptions

from tandem.common.request import StructuredOutput
from tandem.gateway.bodies import ChatCompletionRequest, CompletionRequest, ResponseFormat
from tandem.gateway.errors import bad_request

STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def schema_text(schema: Any, param: str) -> str:
    """`schema` checked (400 naming `param` otherwise) and written as compact JSON text."""
    if isinstance(schema, str):  # vLLM takes a schema as JSON text too
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise bad_request(f"{param} is not valid JSON: {error}.", param) from None
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON schema object.", param)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as error:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise bad_request(f"{param} is not a valid JSON schema: at '{where or '.'}': {error.message}.", param) from None
    except (jsonschema.exceptions.UnknownType, jsonschema.exceptions.RefResolutionError, ValueError) as error:
        raise bad_request(f"{param} is not a valid JSON schema: {error}.", param) from None
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise bad_request(
                f"{param} has the remote $ref {ref!r}; only local references ('#...') are supported.", param
            )
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def requested(body: CompletionRequest | ChatCompletionRequest) -> StructuredOutput | None:
    """The constraint `body` asks for through sources 1 to 3 of the module docstring (at most one)."""
    guided = {new: getattr(body, old) for old, new in GUIDED_FIELDS.items() if getattr(body, old) is not None}
    found: list[tuple[str, StructuredOutput]] = []
    from_format = from_response_format(body.response_format)
    if from_format is not None:
        found.append(("response_format", from_format))
    if body.structured_outputs is not None:
        spec = body.structured_outputs.model_dump(by_alias=True)
        found.append(("structured_outputs", from_vllm(spec, "structured_outputs", "structured_outputs.")))
    for key in guided:
        found.append((f"guided_{key}", from_vllm({key: guided[key]}, f"guided_{key}", "guided_")))
    if len(found) > 1:
        raise bad_request(f"Use only one of {found[0][0]} and {found[1][0]} to constrain the output.", found[1][0])
    return found[0][1] if found else None


def from_response_format(response_format: ResponseFormat | None) -> StructuredOutput | None:
    """OpenAI's `response_format` (its shape already checked by the body model)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput("json_object", "")
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise bad_request(
            'response_format of type "json_schema" needs json_schema.schema.', "response_format.json_schema"
        )
    return StructuredOutput("json_schema", schema_text(spec.json_schema, "response_format.json_schema.schema"))


def from_vllm(structured: Mapping[str, Any], param: str, prefix: str) -> StructuredOutput:
    """vLLM's `structured_outputs` (or one `guided_*` field under its new name); the parameter
    of a constraint `key` is `prefix + key`."""
    given = [key for key in STRUCTURED_KEYS if structured.get(key) not in (None, False)]
    if len(given) != 1:
        names = ", ".join(STRUCTURED_KEYS)
        raise bad_request(f"{param} must set exactly one of {names}; got {len(given)}.", param)
    key = given[0]
    value = structured[key]
    where = prefix + key
    if key == "json":
        return StructuredOutput("json_schema", schema_text(value, where))
    if key == "json_object":
        if value is not True:
            raise bad_request(f"{where} must be true.", where)
        return StructuredOutput("json_object", "")
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{where} must be a non-empty list of strings.", where)
        return StructuredOutput("choice", json.dumps(value, ensure_ascii=False, separators=(",", ":")))
    if not isinstance(value, str) or not value:
        raise bad_request(f"{where} must be a non-empty string.", where)
    return StructuredOutput("regex" if key == "regex" else "grammar", value)


def _refs(schema: Any) -> Iterator[str]:
    """Every `$ref` string in `schema` (iteratively: a deep schema must not exhaust the stack)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                yield ref
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
