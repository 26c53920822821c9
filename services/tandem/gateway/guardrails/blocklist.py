"""`blocklist`: words or phrases that may not appear.

Options (JSON): `words` (required, non-empty list of strings), `case_sensitive` (default
false). A word matches as a whole word: "ban" is not found in "banner". Input: a request whose
prompt contains one is rejected (400 naming the guardrail). Output: the choice stops before
it, with finish_reason "content_filter".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tandem.gateway.guardrails.hooks import ALLOW, GuardInput, InputVerdict, OutputAction, Reject, Span


class Blocklist:
    name = "blocklist"

    def __init__(self, options: Mapping[str, Any]) -> None:
        unknown = set(options) - {"words", "case_sensitive"}
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; valid: case_sensitive, words")
        words = options.get("words")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError('words must be a non-empty list of non-empty strings, e.g. {"words": ["secret"]}')
        case_sensitive = options.get("case_sensitive", False)
        if not isinstance(case_sensitive, bool):
            raise ValueError(f"case_sensitive must be true or false, got {case_sensitive!r}")
        alternatives = "|".join(re.escape(w.strip()) for w in sorted(words, key=len, reverse=True))
        # Whole words: no word character right before or after (`\b` fails next to punctuation).
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", 0 if case_sensitive else re.IGNORECASE)

    def check_input(self, request: GuardInput) -> InputVerdict:
        for text in request.texts():
            if self.pattern.search(text):
                return Reject("the prompt contains a blocked word")
        return ALLOW

    def scan_output(self, text: str) -> Sequence[Span]:
        return [Span(m.start(), m.end(), OutputAction.STOP) for m in self.pattern.finditer(text)]
