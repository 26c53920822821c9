"""The guardrail hook interface: what an input hook and an output hook see and answer.

Who calls what, per request (gateway/serving.py and gateway/generation.py):
1. After `protocol.prepare` validated and tokenized the body, each input hook, in the order of
   `--guardrails`, gets a `GuardInput` (the body's messages or prompt, and its other fields as
   JSON) and answers `ALLOW`, `Rewrite(new GuardInput)` (the next hook sees the rewritten one;
   the gateway prepares it again, so a rewrite is validated like a client's body) or
   `Reject(message)` (the client gets a 400 naming the guardrail; later hooks do not run).
2. Each choice's text, after stop strings, goes through an `OutputWindow` (window.py): every
   output hook's `scan_output(text)` returns the spans of `text` to redact or to stop at.
   Text is held back only as far as the window, so a span up to the window's length is seen
   whole even when it arrives over several deltas.

Hooks are built once per gateway (loading.py) and called on the asyncio loop: they must be
quick and must not block. They own no per-request state (an output hook's `scan_output` is a
pure function of its text); the gateway owns the window of each choice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ALLOW",
    "Allow",
    "GuardInput",
    "InputHook",
    "InputVerdict",
    "OutputAction",
    "OutputHook",
    "Reject",
    "Rewrite",
    "Span",
]


@dataclass(frozen=True)
class GuardInput:
    """A prepared request as an input hook sees it. Exactly one of `messages` (chat: the
    body's messages, JSON objects) and `prompt` (completions: a string, a list of strings, or
    token ids as the client sent them) is not None. `params` holds every other field the
    client set, as JSON. Never mutate the containers: build a new one (`map_texts`,
    `dataclasses.replace`)."""

    messages: tuple[Mapping[str, Any], ...] | None
    prompt: str | list[Any] | None
    params: Mapping[str, Any]

    def texts(self) -> Iterator[str]:
        """Every text of the prompt: message contents (strings and text parts) or prompt
        strings. Token-id prompts have no text."""
        found: list[str] = []

        def collect(text: str) -> str:
            found.append(text)
            return text

        self.map_texts(collect)
        return iter(found)

    def map_texts(self, transform: Callable[[str], str]) -> GuardInput:
        """A copy with `transform` applied to every text that `texts()` yields."""
        if self.messages is not None:
            return replace(self, messages=tuple(_map_message(m, transform) for m in self.messages))
        prompt = self.prompt
        if isinstance(prompt, str):
            return replace(self, prompt=transform(prompt))
        if isinstance(prompt, list):
            return replace(self, prompt=[transform(p) if isinstance(p, str) else p for p in prompt])
        return self

    def to_body(self) -> dict[str, Any]:
        """The JSON body this input stands for (the gateway prepares it again after a rewrite)."""
        body = dict(self.params)
        if self.messages is not None:
            body["messages"] = [dict(m) for m in self.messages]
        else:
            body["prompt"] = self.prompt
        return body


def _map_message(message: Mapping[str, Any], transform: Callable[[str], str]) -> Mapping[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": transform(content)}
    if isinstance(content, list):
        parts = [{**p, "text": transform(p["text"])} if isinstance(p.get("text"), str) else p for p in content]
        return {**message, "content": parts}
    return message


@dataclass(frozen=True)
class Allow:
    """Let the request through as it is."""


ALLOW = Allow()


@dataclass(frozen=True)
class Rewrite:
    """Go on with `request` instead (validated again by the gateway)."""

    request: GuardInput


@dataclass(frozen=True)
class Reject:
    """Refuse the request: a 400 whose message names the guardrail and says `message`."""

    message: str


InputVerdict = Allow | Rewrite | Reject


class OutputAction(str, enum.Enum):
    REDACT = "redact"  # replace the span's text by `Span.replacement`
    STOP = "stop"  # end the choice before the span, with finish_reason "content_filter"


@dataclass(frozen=True)
class Span:
    """`text[start:end]` of the text an output hook was given, and what to do with it."""

    start: int
    end: int
    action: OutputAction
    replacement: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"a span needs 0 <= start < end, got [{self.start}, {self.end})")


@runtime_checkable
class InputHook(Protocol):
    """Sees each prepared request once, before admission."""

    name: str

    def check_input(self, request: GuardInput) -> InputVerdict: ...


@runtime_checkable
class OutputHook(Protocol):
    """Finds the spans of output text to redact or stop at. `text` is the part of one choice's
    output that the window holds (with some already-sent text before it as context); a pure
    function of `text`, which may be called again with more text appended."""

    name: str

    def scan_output(self, text: str) -> Sequence[Span]: ...
