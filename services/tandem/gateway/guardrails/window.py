"""The bounded look-ahead window of one choice's output text (`OutputWindow`).

Lifecycle: `Generation` makes one window per choice (only when output hooks are configured)
and pushes each delta's text, after stop strings, with `final=True` on the last one. A push
returns the text that may go to the client now and, when a hook asked to stop, its name.

Invariant: a character is released only once `window_chars` more characters follow it (or
the output ended), so every span of at most `window_chars` characters is whole in the held
text before any of its characters is released: a span that crosses two deltas is caught.
The held text is scanned with up to `window_chars` released characters before it as context
(so that `\\b` and look-behinds see what precedes it); spans that start in the context were
decided earlier and are skipped. Of the spans that start before the release point, a redaction
is replaced (and the release point moves past it, so no span is cut in two), a stop ends the
choice: the text before the span is released and the rest is dropped. Spans that start later
wait for more text. Overlapping spans: the first by start (the longer one on a tie) wins.
Longer spans than the window may be released in part: size the window for the longest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandem.gateway.guardrails.hooks import OutputAction, OutputHook, Span


@dataclass(frozen=True)
class Released:
    """What one push releases: `text` for the client, and `stopped_by`, the name of the hook
    that stopped the choice (None: it goes on)."""

    text: str
    stopped_by: str | None = None


class OutputWindow:
    """One choice's window; owned by its `Generation` task (not thread-safe, not shared)."""

    def __init__(
        self, hooks: Sequence[OutputHook], window_chars: int, on_action: Callable[[str, str], None] | None = None
    ) -> None:
        """`on_action(guardrail, action)`: told of each span redacted ("redact") and of a stop."""
        if window_chars < 1:
            raise ValueError(f"window_chars must be >= 1, got {window_chars}")
        self._hooks = tuple(hooks)
        self._on_action = on_action
        self._window = window_chars
        self._context = ""  # the last released raw characters (at most the window)
        self._held = ""  # raw characters not released yet
        self._stopped: str | None = None

    @property
    def held_chars(self) -> int:
        return len(self._held)

    def push(self, text: str, final: bool) -> Released:
        """Add `text`; release what the window allows (everything when `final`)."""
        if self._stopped is not None:
            return Released("", self._stopped)
        self._held += text
        scan = self._context + self._held
        base = len(self._context)
        cut = len(scan) if final else len(scan) - self._window
        if cut <= base:
            return Released("")
        out: list[str] = []
        pos = base
        for hook, span in self._spans(scan):
            if span.start < pos:
                continue  # in the context (decided before) or inside an earlier span
            if span.start >= cut:
                break
            out.append(scan[pos : span.start])
            if self._on_action is not None:
                self._on_action(hook, "stop" if span.action is OutputAction.STOP else "redact")
            if span.action is OutputAction.STOP:
                self._stopped = hook
                self._held = ""
                return Released("".join(out), hook)
            out.append(span.replacement)
            pos = span.end
            cut = max(cut, span.end)
        out.append(scan[pos:cut])
        self._held = scan[cut:]
        self._context = scan[max(0, cut - self._window) : cut]
        return Released("".join(out))

    def _spans(self, scan: str) -> list[tuple[str, Span]]:
        found = [(hook.name, span) for hook in self._hooks for span in hook.scan_output(scan)]
        for name, span in found:
            if span.end > len(scan):
                raise ValueError(f"guardrail {name!r} returned a span past the text's end: {span}")
        found.sort(key=lambda item: (item[1].start, -item[1].end))
        return found
