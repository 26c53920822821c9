"""`tool_choice` of one chat request: what the template sees, what constrains the output, and how
the output becomes tool calls.

    none       tools are left out of the template (as vLLM); the output is plain content.
    auto       (the default when tools are given) the template sees the tools; the gateway's
               `--tool-call-parser` (required: 400 without one) turns the output into calls.
    required   the output is constrained to a JSON array of {"name", "parameters"} objects, one
               `anyOf` branch per tool, at least one item (at most one unless
               `parallel_tool_calls`), as vLLM builds it; each item becomes a call.
    named      {"type": "function", "function": {"name": ...}}: the output is constrained to
               that function's parameters schema and is that function's arguments.

`required` and `named` send their schema as `StructuredOutput("json_schema", ...)`, so the
arguments parse against the function's schema, whatever the parser. Built once per request by
`protocol.prepare`; `extract` (whole output) and `stream` (`ToolCallStream`) apply it per choice.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from tandem.common.request import StructuredOutput
from tandem.gateway.bodies import ChatCompletionRequest, NamedToolChoice, Tool
from tandem.gateway.errors import bad_request
from tandem.gateway.structured import schema_text
from tandem.gateway.tools.parsers import FunctionCall, ParsedOutput, ToolParser, call_from_object, make_parser

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolChoiceKind(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True)
class ToolChoice:
    """How one request's output relates to its tools. `function` names the function of NAMED;
    `parser` is set for AUTO only."""

    kind: ToolChoiceKind
    tools: tuple[Tool, ...]
    parallel: bool = True
    function: str | None = None
    parser: ToolParser | None = None

    @classmethod
    def of(cls, body: ChatCompletionRequest, parser_name: str | None) -> ToolChoice | None:
        """The request's tool choice; None when it gives no tools (or tool_choice "none" with none)."""
        tools = tuple(body.tools or ())
        choice = body.tool_choice
        parallel = body.parallel_tool_calls is not False
        if choice is None:
            choice = "auto" if tools else "none"
        if choice == "none":
            return cls(ToolChoiceKind.NONE, tools, parallel) if tools else None
        if not tools:
            raise bad_request(f"tool_choice {_describe(choice)} needs tools.", "tool_choice")
        if isinstance(choice, NamedToolChoice):
            names = {tool.function.name for tool in tools}
            if choice.function.name not in names:
                raise bad_request(f"Tool '{choice.function.name}' has not been passed in `tools`.", "tool_choice")
            return cls(ToolChoiceKind.NAMED, tools, parallel, choice.function.name)
        if choice == "required":
            return cls(ToolChoiceKind.REQUIRED, tools, parallel)
        if parser_name is None:
            raise bad_request(
                '"auto" tool choice requires the gateway to run with --tool-call-parser; '
                'use tool_choice "required", a named function or "none".',
                "tool_choice",
            )
        return cls(ToolChoiceKind.AUTO, tools, parallel, parser=make_parser(parser_name))

    def template_tools(self) -> list[dict[str, Any]] | None:
        """`tools` as the chat template receives them (OpenAI's shape); None for "none"."""
        if self.kind is ToolChoiceKind.NONE:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def structured_output(self) -> StructuredOutput | None:
        """The constraint that enforces "required" or a named function; None otherwise."""
        if self.kind is ToolChoiceKind.NAMED:
            tool = next(t for t in self.tools if t.function.name == self.function)
            parameters = tool.function.parameters or _EMPTY_PARAMETERS
            return StructuredOutput("json_schema", schema_text(parameters, "tools.function.parameters"))
        if self.kind is not ToolChoiceKind.REQUIRED:
            return None
        definitions: dict[str, Any] = {}
        branches = []
        for tool in self.tools:
            parameters = dict(tool.function.parameters or _EMPTY_PARAMETERS)
            defs = parameters.pop("$defs", {})
            if not isinstance(defs, dict):
                raise bad_request(f"The $defs of tool '{tool.function.name}' must be an object.", "tools")
            for name, definition in defs.items():
                if definitions.setdefault(name, definition) != definition:
                    raise bad_request(
                        f"Tool definition '{name}' has multiple schemas, which is not supported.", "tools"
                    )
            branches.append(
                {
                    "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
                    "required": ["name", "parameters"],
                }
            )
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": branches}}
        if not self.parallel:
            schema["maxItems"] = 1
        if definitions:
            schema["$defs"] = definitions
        return StructuredOutput("json_schema", schema_text(schema, "tools"))

    @property
    def reads_calls(self) -> bool:
        """Whether the output is read for calls (every kind but "none")."""
        return self.kind is not ToolChoiceKind.NONE

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the output must be detokenized with special tokens (a marker is one)."""
        return self.parser is not None and self.parser.keeps_special_tokens

    def extract(self, text: str) -> ParsedOutput:
        """A whole output as content and calls; output that is not a call stays content."""
        if self.kind is ToolChoiceKind.AUTO and self.parser is not None:
            return self.parser.parse(text)
        if self.kind is ToolChoiceKind.NAMED and self.function is not None:
            return ParsedOutput(None, (FunctionCall(self.function, text),))
        if self.kind is ToolChoiceKind.REQUIRED:
            calls = required_calls(text)
            if calls:
                return ParsedOutput(None, calls)
        return ParsedOutput(text, ())


def required_calls(text: str) -> tuple[FunctionCall, ...]:
    """The calls of a "required" output (a JSON array of {"name", "parameters"}); () if it is not one."""
    try:
        items = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return ()
    if not isinstance(items, list):
        return ()
    calls = [call_from_object(item, ("parameters",)) for item in items]
    return tuple(c for c in calls if c is not None) if all(c is not None for c in calls) else ()


def _describe(choice: str | NamedToolChoice) -> str:
    return f"'{choice}'" if isinstance(choice, str) else f"for function '{choice.function.name}'"
