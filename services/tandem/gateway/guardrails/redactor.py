"""`regex_redactor`: replaces what named regular expressions match.

Options (JSON, all optional):
- `patterns`: {name: regex} added to the defaults (a name already there replaces it);
- `defaults`: false drops the default patterns (`email`, `card`);
- `replacement`: the text put in place of a match; `{name}` stands for the pattern's name
  (default "[REDACTED]");
- `apply_to`: ["output"] (default), ["input"] or both. On input it rewrites the prompt's texts.

The `card` pattern matches 13 to 19 digits, optionally grouped by single spaces or dashes
(payment card numbers); it does not check the Luhn digit. Patterns are Python `re` syntax.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tandem.gateway.guardrails.hooks import ALLOW, GuardInput, InputVerdict, OutputAction, Rewrite, Span

DEFAULT_PATTERNS: Mapping[str, str] = {
    "email": r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}",
    "card": r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])",
}
_SIDES = ("input", "output")


class RegexRedactor:
    name = "regex_redactor"

    def __init__(self, options: Mapping[str, Any]) -> None:
        unknown = set(options) - {"patterns", "defaults", "replacement", "apply_to"}
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; valid: apply_to, defaults, patterns, replacement")
        extra = options.get("patterns", {})
        if not isinstance(extra, dict) or not all(isinstance(v, str) and v for v in extra.values()):
            raise ValueError('patterns must be an object of non-empty regex strings, e.g. {"ssn": "\\\\d{3}-\\\\d{2}"}')
        defaults = options.get("defaults", True)
        if not isinstance(defaults, bool):
            raise ValueError(f"defaults must be true or false, got {defaults!r}")
        patterns = {**(DEFAULT_PATTERNS if defaults else {}), **extra}
        if not patterns:
            raise ValueError("no patterns: give patterns, or keep the defaults")
        replacement = options.get("replacement", "[REDACTED]")
        if not isinstance(replacement, str):
            raise ValueError(f"replacement must be a string, got {replacement!r}")
        sides = options.get("apply_to", ["output"])
        if not isinstance(sides, list) or not sides or any(s not in _SIDES for s in sides):
            raise ValueError(f'apply_to must be a non-empty list of "input" and "output", got {sides!r}')
        self.patterns: dict[str, re.Pattern[str]] = {}
        for name, regex in patterns.items():
            try:
                self.patterns[name] = re.compile(regex)
            except re.error as exc:
                raise ValueError(f"pattern {name!r} is not a valid regex: {exc}") from None
        self.replacements = {name: replacement.replace("{name}", name) for name in patterns}
        self.on_input = "input" in sides
        self.on_output = "output" in sides

    def redact(self, text: str) -> str:
        """`text` with every match replaced, one pattern after another."""
        for name, pattern in self.patterns.items():
            text = pattern.sub(self.replacements[name], text)
        return text

    def check_input(self, request: GuardInput) -> InputVerdict:
        if not self.on_input:
            return ALLOW
        rewritten = request.map_texts(self.redact)
        return ALLOW if rewritten == request else Rewrite(rewritten)

    def scan_output(self, text: str) -> Sequence[Span]:
        if not self.on_output:
            return ()
        return [
            Span(m.start(), m.end(), OutputAction.REDACT, self.replacements[name])
            for name, pattern in self.patterns.items()
            for m in pattern.finditer(text)
            if m.end() > m.start()
        ]
