"""Streaming tool calls: one choice's text deltas in, OpenAI's content and `tool_calls` deltas out.

OpenAI's shape: each call first appears as {"index", "id", "type": "function", "function":
{"name", "arguments": ""}}, then as {"index", "function": {"arguments": fragment}} deltas whose
concatenation is the call's arguments JSON. Per tool choice (`choice.ToolChoice`):
    auto      content streams until the parser's `start` says the calls begin (a suffix that may
              be the start of a marker is held back until it is decided); from there, each call
              goes out once the parser reports it `completed`, and the rest at the end, from
              `parse` of the whole output (so the calls equal the non-streaming ones). If the
              whole output turns out not to be calls, the held text goes out as content.
    named     the output is the arguments: the call's head goes first, then every text delta as
              an arguments fragment, as it arrives.
    required  the array of calls is only known whole: the calls go out at the end.
Owned by one choice of one streaming response (`response_view.ResponseView`); not thread-safe.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tandem.gateway.tools.choice import ToolChoice, ToolChoiceKind
from tandem.gateway.tools.parsers import FunctionCall, ParsedOutput


def new_call_id(mistral_style: bool = False) -> str:
    """A fresh call id: OpenAI's `call_...`, or Mistral's 9 alphanumerics (its templates check them)."""
    return uuid.uuid4().hex[:9] if mistral_style else f"call_{uuid.uuid4().hex[:24]}"


def call_json(call: FunctionCall, call_id: str) -> dict[str, Any]:
    """One call in a message's `tool_calls`."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


@dataclass
class StreamDelta:
    """What one push or the finish adds: `content` text (may be "") and tool-call deltas."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class ToolCallStream:
    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self.text = ""
        self.sent_content = 0  # characters of `text` sent as content
        self.num_calls = 0  # calls whose head went out
        self.in_calls = False  # the parser said the calls have begun (auto)
        self._mistral = choice.parser is not None and choice.parser.name == "mistral"

    @property
    def called(self) -> bool:
        return self.num_calls > 0

    def push(self, text: str) -> StreamDelta:
        """The deltas for new output `text`."""
        self.text += text
        kind = self.choice.kind
        if kind is ToolChoiceKind.NAMED:
            out = StreamDelta()
            if self.num_calls == 0:
                out.tool_calls.append(self._head(FunctionCall(self.choice.function or "", "")))
            if text:
                out.tool_calls.append({"index": 0, "function": {"arguments": text}})
            return out
        parser = self.choice.parser
        if kind is not ToolChoiceKind.AUTO or parser is None:
            return StreamDelta()  # required: decided at the end
        if not self.in_calls:
            start = parser.start(self.text)
            if start is None:
                if not self.text[self.sent_content :].strip() and self.sent_content == 0:
                    return StreamDelta()  # leading white space: content or not, decided later
                return StreamDelta(self._content(len(self.text) - _held(self.text, parser.markers)))
            self.in_calls = True
            out = StreamDelta(self._content(start))
        else:
            out = StreamDelta()
        for call in parser.completed(self.text)[self.num_calls :]:
            out.tool_calls.extend(self._whole(call))
        return out

    def finish(self) -> StreamDelta:
        """The deltas the end of the output adds (whatever was held back)."""
        if self.choice.kind is ToolChoiceKind.NAMED:
            return StreamDelta(
                tool_calls=[] if self.num_calls else [self._head(FunctionCall(self.choice.function or "", ""))]
            )
        parsed: ParsedOutput = self.choice.extract(self.text)
        if not parsed.calls:  # not calls after all: everything unsent is content
            return StreamDelta(self._content(len(self.text)))
        out = StreamDelta()
        if self.num_calls == 0 and parsed.content is not None:
            out.content = parsed.content[self.sent_content :]
        for call in parsed.calls[self.num_calls :]:
            out.tool_calls.extend(self._whole(call))
        return out

    def _content(self, end: int) -> str:
        text = self.text[self.sent_content : end]
        self.sent_content = max(self.sent_content, end)
        return text

    def _head(self, call: FunctionCall) -> dict[str, Any]:
        index = self.num_calls
        self.num_calls += 1
        head = call_json(FunctionCall(call.name, ""), new_call_id(self._mistral))
        return {"index": index, **head}

    def _whole(self, call: FunctionCall) -> list[dict[str, Any]]:
        head = self._head(call)
        return [head, {"index": head["index"], "function": {"arguments": call.arguments}}]


def _held(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of `text` may still begin a marker (held back from content)."""
    held = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                held = max(held, size)
                break
    return held
