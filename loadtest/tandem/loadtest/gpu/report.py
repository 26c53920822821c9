"""What a GPU-check step reports, and the one markdown summary of a whole check.

A step returns tables of figures (`Table`); the runner wraps them in a `StepReport` with the
step's outcome and duration. Reports cross a process boundary as JSON (each step runs in its
own process so that a hang or a crash is bounded), so both types round-trip through plain dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Outcome(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    TIMED_OUT = "timed out"


@dataclass(frozen=True)
class Table:
    """One table of a step's figures: a title, column headers, and rows of cells (already
    formatted as text, so the summary shows exactly what the step measured)."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.headers):
                raise ValueError(
                    f"table {self.title!r}: row {row!r} has {len(row)} cells, expected {len(self.headers)}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "headers": list(self.headers),
            "rows": [list(r) for r in self.rows],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Table:
        return cls(
            title=str(data["title"]),
            headers=tuple(str(h) for h in data["headers"]),
            rows=tuple(tuple(str(c) for c in row) for row in data["rows"]),
            notes=tuple(str(n) for n in data.get("notes", ())),
        )


@dataclass(frozen=True)
class StepReport:
    """The outcome of one step: its tables, how long it ran, and why it failed or skipped."""

    name: str
    title: str
    outcome: Outcome
    seconds: float
    limit_s: float
    tables: tuple[Table, ...] = ()
    message: str = ""  # the reason for a skip, the error of a failure (its last lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "outcome": self.outcome.value,
            "seconds": self.seconds,
            "limit_s": self.limit_s,
            "tables": [t.to_dict() for t in self.tables],
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepReport:
        return cls(
            name=str(data["name"]),
            title=str(data["title"]),
            outcome=Outcome(data["outcome"]),
            seconds=float(data["seconds"]),
            limit_s=float(data["limit_s"]),
            tables=tuple(Table.from_dict(t) for t in data.get("tables", ())),
            message=str(data.get("message", "")),
        )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> list[str]:
    lines = [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(_cell(h) for h in table.headers) + " |")
    lines.append("|" + "|".join(" --- " for _ in table.headers) + "|")
    lines.extend("| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows)
    if table.notes:
        lines.append("")
        lines.extend(f"- {note}" for note in table.notes)
    return lines


def render_summary(heading: str, environment: Sequence[tuple[str, str]], steps: Sequence[StepReport]) -> str:
    """The summary: the machine and versions, an overview of the steps, then each step's tables
    (or its skip reason, or its error)."""
    lines = [f"## {heading}", ""]
    lines.extend(f"- {key}: {value}" for key, value in environment)
    lines += ["", "| step | outcome | time | limit |", "| --- | --- | --- | --- |"]
    for step in steps:
        lines.append(f"| {_cell(step.title)} | {step.outcome.value} | {step.seconds:.1f} s | {step.limit_s:.0f} s |")
    for index, step in enumerate(steps, start=1):
        blocks = [[f"### {index}. {step.title}: {step.outcome.value}"]]
        if step.message:
            fence = step.outcome in (Outcome.FAILED, Outcome.TIMED_OUT)
            blocks.append(["```", step.message.rstrip(), "```"] if fence else [step.message])
        blocks.extend(markdown_table(table) for table in step.tables)
        for block in blocks:
            lines += ["", *block]
    return "\n".join(lines).rstrip() + "\n"
