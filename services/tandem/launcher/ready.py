"""The ready-line protocol: how a starting child says it is up, and how we wait for it.

A child announces itself with one JSON line on stdout, `{"event": "ready", "address": ...,
...}` (`parse_ready` recognises it). `wait_all_ready()` waits for several children at once (a
`ChildProcess`, or anything `Starting`, such as a Ray worker actor's handle) and fails with
`ChildStartError` (quoting the output tail) as soon as any one of them exits without its ready
line or the bound passes, or with `StartCancelled` once the caller asks to stop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

POLL_INTERVAL_S = 0.05


class ChildStartError(RuntimeError):
    """A child exited, or did not print its ready line, before its deadline."""


class StartCancelled(RuntimeError):
    """The caller asked to stop (e.g. SIGTERM) while a child was starting."""


def parse_ready(line: str) -> dict[str, Any] | None:
    """The JSON object of `line` if it is a ready line (`"event": "ready"`), else None."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message if isinstance(message, dict) and message.get("event") == "ready" else None


class Starting(Protocol):
    """What `wait_all_ready` reads of a child (a `ChildProcess`, or a Ray worker actor's handle)."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def check_ready(self) -> dict[str, Any] | None: ...

    def output_tail(self) -> str: ...


def wait_all_ready(children: Sequence[Starting], timeout_s: float, cancelled: Callable[[], bool] | None = None) -> None:
    """Block until every child printed its ready line. Raises `ChildStartError` as soon as one
    of them exits without it, or when `timeout_s` passes, and `StartCancelled` as soon as
    `cancelled()` is true. The children are left running: the caller stops them."""
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while True:
        pending = [child for child in pending if child.check_ready() is None]
        if not pending:
            return
        if cancelled is not None and cancelled():
            raise StartCancelled(f"cancelled while waiting for {', '.join(c.name for c in pending)}")
        if time.monotonic() >= deadline:
            first = pending[0]
            raise ChildStartError(
                f"{', '.join(f'{c.name} (pid {c.pid})' for c in pending)} not ready after {timeout_s} s; "
                f"last output of {first.name}:\n{first.output_tail()}"
            )
        time.sleep(POLL_INTERVAL_S)
