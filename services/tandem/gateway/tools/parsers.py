"""Tool-call parsers: a model's generated text in, OpenAI tool calls and the remaining content out.

One parser per output convention, chosen with the gateway's `--tool-call-parser` (vLLM's
names and formats, from vllm/entrypoints/openai/tool_parsers/):
    hermes       Qwen2.5 / Qwen3 / Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
                 one block per call; the last block may be left unclosed. Content is the text
                 before the first block.
    llama3_json  Llama 3.1+ JSON tool calls: the output is (optionally after `<|python_tag|>`) one
                 or more JSON objects {"name": ..., "parameters": {...}} ("arguments" also
                 accepted) separated by ";". Output that does not start so is plain content.
    mistral      Mistral: `[TOOL_CALLS]` followed by a JSON array of {"name", "arguments"}
                 objects. Content is the text before the marker. `[TOOL_CALLS]` is a special
                 token, so the detokenizer must keep special tokens (`keeps_special_tokens`).

A parser is pure: `parse(text)` for a whole output, and for streaming `start(text)` (where the
calls begin, so that the content before can be sent at once) and `completed(text)` (the calls of
a prefix that no later text can change; always a prefix of `parse` of any longer output). Output
that claims to be a call but does not parse stays content, as vLLM does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class FunctionCall:
    """One call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedOutput:
    """What a parser made of one output: `content` (None: none) and its calls, in order."""

    content: str | None
    calls: tuple[FunctionCall, ...]


class ToolParser(Protocol):
    """A stateless parser of one output convention (see the module docstring)."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]  # text that may open the calls (held back while streaming)
    keeps_special_tokens: ClassVar[bool]

    def parse(self, text: str) -> ParsedOutput: ...

    def start(self, text: str) -> int | None:
        """Where the calls begin in `text` (None: not, or not yet)."""
        ...

    def completed(self, text: str) -> tuple[FunctionCall, ...]: ...


def call_from_object(obj: Any, arguments_keys: tuple[str, ...] = ("arguments",)) -> FunctionCall | None:
    """{"name": str, "arguments": {...}} as a call; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in arguments_keys if k in obj), None)
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return FunctionCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class HermesParser:
    name: ClassVar[str] = "hermes"
    markers: ClassVar[tuple[str, ...]] = ("<tool_call>",)
    keeps_special_tokens: ClassVar[bool] = False
    _block = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
    _closed = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        start = self.start(text)
        if start is None:
            return ParsedOutput(text, ())
        calls = []
        for closed, open_ in self._block.findall(text):
            call = call_from_object(_loads(closed or open_))
            if call is None:  # a block that is not a call ends the calls (and a stream's too)
                break
            calls.append(call)
        if not calls:
            return ParsedOutput(text, ())
        return ParsedOutput(text[:start] or None, tuple(calls))

    def start(self, text: str) -> int | None:
        index = text.find("<tool_call>")
        return None if index < 0 else index

    def completed(self, text: str) -> tuple[FunctionCall, ...]:
        out = []
        for body in self._closed.findall(text):
            call = call_from_object(_loads(body))
            if call is None:
                break
            out.append(call)
        return tuple(out)


class Llama3JsonParser:
    name: ClassVar[str] = "llama3_json"
    markers: ClassVar[tuple[str, ...]] = ("<|python_tag|>", "{")
    keeps_special_tokens: ClassVar[bool] = False
    _tag = "<|python_tag|>"

    def parse(self, text: str) -> ParsedOutput:
        start = self.start(text)
        if start is None:
            return ParsedOutput(text, ())
        calls, _ = self._objects(text)
        return ParsedOutput(None, calls) if calls else ParsedOutput(text, ())

    def start(self, text: str) -> int | None:
        return 0 if text.lstrip().startswith((self._tag, "{")) else None

    def completed(self, text: str) -> tuple[FunctionCall, ...]:
        return () if self.start(text) is None else self._objects(text)[0]

    def _objects(self, text: str) -> tuple[tuple[FunctionCall, ...], str]:
        """The calls at the start of `text`, and what follows them (text after the last call
        that parses is dropped, as a stream could not take back the calls already sent)."""
        text = text.lstrip().removeprefix(self._tag)
        calls: list[FunctionCall] = []
        position = 0
        while True:
            position = _skip(text, position, " \t\r\n;" if calls else " \t\r\n")
            try:
                obj, end = _DECODER.raw_decode(text, position)
            except (json.JSONDecodeError, RecursionError):
                return tuple(calls), text[position:]
            call = call_from_object(obj, ("parameters", "arguments"))
            if call is None:
                return tuple(calls), text[position:]
            calls.append(call)
            position = end


class MistralParser:
    name: ClassVar[str] = "mistral"
    markers: ClassVar[tuple[str, ...]] = ("[TOOL_CALLS]",)
    keeps_special_tokens: ClassVar[bool] = True
    _marker = "[TOOL_CALLS]"

    def parse(self, text: str) -> ParsedOutput:
        start = self.start(text)
        if start is None:
            return ParsedOutput(text, ())
        calls, _ = self._array(text[start + len(self._marker) :])
        if not calls:  # an array cut short keeps the calls that closed (a stream sent them)
            return ParsedOutput(text, ())
        return ParsedOutput(text[:start] or None, calls)

    def start(self, text: str) -> int | None:
        index = text.find(self._marker)
        return None if index < 0 else index

    def completed(self, text: str) -> tuple[FunctionCall, ...]:
        start = self.start(text)
        return () if start is None else self._array(text[start + len(self._marker) :])[0]

    def _array(self, text: str) -> tuple[tuple[FunctionCall, ...], bool]:
        """The calls of the JSON array `text` starts with, and whether the array is complete and
        all calls (decoded element by element, so that a stream sees each call once it closes)."""
        position = _skip(text, 0, " \t\r\n")
        if not text.startswith("[", position):
            return (), False
        calls: list[FunctionCall] = []
        position += 1
        while True:
            position = _skip(text, position, " \t\r\n")
            if text.startswith("]", position):
                return tuple(calls), True
            if calls:
                if not text.startswith(",", position):
                    return tuple(calls), False
                position = _skip(text, position + 1, " \t\r\n")
            try:
                obj, position = _DECODER.raw_decode(text, position)
            except (json.JSONDecodeError, RecursionError):
                return tuple(calls), False
            call = call_from_object(obj)
            if call is None:
                return tuple(calls), False
            calls.append(call)


PARSERS: dict[str, type[HermesParser] | type[Llama3JsonParser] | type[MistralParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3JsonParser, MistralParser)
}


def make_parser(name: str) -> ToolParser:
    """The parser registered as `name` (ValueError naming the choices otherwise)."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(PARSERS)}")
    return PARSERS[name]()


def _loads(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return None


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position
