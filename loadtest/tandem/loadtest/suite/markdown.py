"""BENCHMARKS.md from the sections of one run."""

from __future__ import annotations

from collections.abc import Sequence

from tandem.loadtest.suite.figures import Figure, Section
from tandem.loadtest.suite.machine import MachineInfo


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _value(figure: Figure) -> str:
    """Ratios (unit "x") and fractions (unit "") with three decimals, so that a value just
    under its goal never prints as the goal; quantities with a unit whole."""
    return f"{figure.value:.3f}" if figure.unit in ("x", "") else f"{figure.value:.0f}{figure.unit}"


def render(sections: Sequence[Section], machine: MachineInfo, started: str, duration_s: float, quick: bool) -> str:
    """The whole file: summary table of every figure against its goal, then one part per section."""
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m tandem.loadtest bench`). Every ratio is measured side by side in "
        "the same run, on the machine below. Figures without a goal are context. A missed goal is "
        "marked **missed**; it is never dropped.",
        "",
    ]
    if quick:
        lines += [
            "> **Quick run** (`--quick`): tiny sizes for testing the suite; these are not the project's figures.",
            "",
        ]
    lines += [f"Run started {started}, took {duration_s / 60:.1f} min.", ""]
    lines += _table([("", ""), *machine.rows()]) + [""]
    lines += ["## Summary", ""]
    summary = [("benchmark", "figure", "measured", "goal", "")]
    for section in sections:
        if section.error is not None:
            summary.append((section.title, "(did not run to the end)", "-", "-", "**failed**"))
        for figure in section.figures:
            summary.append((section.title, figure.name, _value(figure), figure.goal_text(), figure.verdict()))
    lines += _table(summary) + [""]
    missed = [(s, f) for s in sections for f in s.missed]
    failed = [s for s in sections if s.error is not None]
    if missed or failed:
        lines += [
            "Goals missed in this run: "
            + ("; ".join(f"{f.name} ({_value(f)}, goal {f.goal_text()})" for _, f in missed) or "none")
            + "."
        ]
        if failed:
            lines += ["Sections that failed: " + ", ".join(s.title for s in failed) + "."]
        lines += [""]
    for section in sections:
        lines += [f"## {section.title}", "", section.setup, ""]
        if section.error is not None:
            lines += ["**Failed:**", "", "```", section.error.strip(), "```", ""]
        lines += _table(section.table) + ([""] if section.table else [])
        if section.notes:
            lines += ["```", *section.notes, "```", ""]
        lines += [f"_{section.duration_s:.0f} s_", ""]
    return "\n".join(lines)
