"""Choosing guardrails: the `--guardrails` spec, entry-point loading, and the loaded chain.

Spec: a comma-separated list of `name` or `name:{json options}`, e.g.
`regex_redactor:{"patterns": {"ssn": "\\d{3}-\\d{2}-\\d{4}"}},blocklist:{"words": ["secret"]}`.
Hooks run in that order. Each name is an entry point of the `tandem.guardrails` group; its
object is called with the options (a dict, {} when none) and returns the hook, an object with
`check_input` (an input hook), `scan_output` (an output hook), or both (hooks.py). Tandem's
own pyproject declares the built-ins `regex_redactor` and `blocklist`; another package adds
one by declaring an entry point in the same group.

`load_guardrails` raises ValueError naming the guardrail for an unknown name, bad options or
an object that is no hook: `GatewayConfig` calls it, so the gateway refuses to start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import BaseModel

from tandem.gateway.errors import OpenAIError
from tandem.gateway.guardrails.hooks import GuardInput, InputHook, OutputHook, Reject, Rewrite
from tandem.gateway.guardrails.window import OutputWindow

ENTRY_POINT_GROUP = "tandem.guardrails"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class GuardrailSpec:
    name: str
    options: Mapping[str, Any]


def parse_guardrails(spec: str) -> tuple[GuardrailSpec, ...]:
    """The specs of `spec` in order; ValueError pointing at the first thing that is wrong."""
    out: list[GuardrailSpec] = []
    decoder = json.JSONDecoder()
    pos, n = 0, len(spec)
    while pos < n:
        end = pos
        while end < n and spec[end] not in ",:":
            end += 1
        name = spec[pos:end].strip()
        if not name or not set(name) <= _NAME_CHARS:
            raise ValueError(f"--guardrails: expected a guardrail name at character {pos}, got {spec[pos:end]!r}")
        options: Any = {}
        pos = end
        if pos < n and spec[pos] == ":":
            try:
                options, pos = decoder.raw_decode(spec, pos + 1)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--guardrails: the options of {name!r} are not valid JSON: {exc}") from None
            if not isinstance(options, dict):
                raise ValueError(f"--guardrails: the options of {name!r} must be a JSON object, got {options!r}")
            while pos < n and spec[pos] == " ":
                pos += 1
        if pos < n:
            if spec[pos] != ",":
                raise ValueError(f"--guardrails: expected ',' after {name!r} at character {pos}, got {spec[pos:]!r}")
            pos += 1
        out.append(GuardrailSpec(name, options))
    if len({s.name for s in out}) != len(out):
        raise ValueError(f"--guardrails: a guardrail is named twice in {spec!r}")
    return tuple(out)


class Guardrails:
    """The loaded hooks of one gateway, in spec order; shared by every request."""

    def __init__(
        self,
        hooks: Sequence[InputHook | OutputHook],
        window_chars: int,
        on_action: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_action(guardrail, action)` is told of every action a hook takes: "reject",
        "rewrite" (input), "redact" (one span), "stop" (output); the gateway counts them."""
        self.hooks = tuple(hooks)
        self.input_hooks = tuple(h for h in hooks if isinstance(h, InputHook))
        self.output_hooks = tuple(h for h in hooks if isinstance(h, OutputHook))
        self.window_chars = window_chars
        self.on_action = on_action

    def counted(self, on_action: Callable[[str, str], None]) -> Guardrails:
        """The same hooks, telling `on_action` of each action they take."""
        return Guardrails(self.hooks, self.window_chars, on_action) if self.hooks else self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hooks)

    def check_input(self, request: GuardInput) -> GuardInput | None:
        """Run the input hooks in order: the rewritten request, or None when none rewrote it.
        A rejection raises the 400 (`code` "content_policy_violation") naming the hook."""
        rewritten: GuardInput | None = None
        for hook in self.input_hooks:
            verdict = hook.check_input(rewritten or request)
            if self.on_action is not None and isinstance(verdict, (Reject, Rewrite)):
                self.on_action(hook.name, "reject" if isinstance(verdict, Reject) else "rewrite")
            if isinstance(verdict, Reject):
                raise OpenAIError(
                    400,
                    f"Request rejected by guardrail {hook.name!r}: {verdict.message}.",
                    "invalid_request_error",
                    None,
                    "content_policy_violation",
                )
            if isinstance(verdict, Rewrite):
                rewritten = verdict.request
        return rewritten

    def output_window(self) -> OutputWindow | None:
        """A new window for one choice; None without output hooks (the text is not held)."""
        return OutputWindow(self.output_hooks, self.window_chars, self.on_action) if self.output_hooks else None


NO_GUARDRAILS = Guardrails((), 1)


def guard_input(body: BaseModel) -> GuardInput:
    """A validated completions or chat body as its input hooks see it (the fields it set)."""
    fields = body.model_dump(mode="json", by_alias=True, exclude_unset=True)
    messages = fields.pop("messages", None)
    prompt = fields.pop("prompt", None)
    return GuardInput(None if messages is None else tuple(messages), prompt if messages is None else None, fields)


def load_guardrails(spec: str, window_chars: int, installed: Mapping[str, EntryPoint] | None = None) -> Guardrails:
    """The hooks that `spec` names, built from the `tandem.guardrails` entry points (or
    `installed`, name -> entry point)."""
    specs = parse_guardrails(spec)
    if not specs:
        return NO_GUARDRAILS
    if installed is None:
        installed = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    hooks: list[InputHook | OutputHook] = []
    for item in specs:
        entry = installed.get(item.name)
        if entry is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ValueError(
                f"unknown guardrail {item.name!r} in --guardrails; "
                f"installed ({ENTRY_POINT_GROUP} entry points): {known}"
            )
        try:
            hook = entry.load()(dict(item.options))
        except ValueError as exc:
            raise ValueError(f"guardrail {item.name!r}: {exc}") from None
        if not isinstance(hook, (InputHook, OutputHook)):
            raise ValueError(f"guardrail {item.name!r} ({entry.value}) has neither check_input nor scan_output")
        hooks.append(hook)
    return Guardrails(hooks, window_chars)
