"""What a benchmark section returns: figures (ratios measured in one run) next to their goals."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class Direction(str, enum.Enum):
    """How a figure is compared with its goal."""

    AT_LEAST = ">="
    AT_MOST = "<="


@dataclass(frozen=True)
class Figure:
    """One measured figure. `goal` None: reported without a goal (context, not a claim)."""

    name: str
    value: float
    unit: str = "x"
    goal: float | None = None
    direction: Direction = Direction.AT_LEAST

    def __post_init__(self) -> None:
        if not math.isfinite(self.value):
            raise ValueError(f"figure {self.name!r} is not a finite number: {self.value!r}")

    @property
    def met(self) -> bool | None:
        """True/False against the goal; None when the figure has no goal."""
        if self.goal is None:
            return None
        return self.value >= self.goal if self.direction is Direction.AT_LEAST else self.value <= self.goal

    def goal_text(self) -> str:
        return (
            "" if self.goal is None else f"{self.direction.value} {self.goal:g}{self.unit if self.unit != 'x' else ''}"
        )

    def verdict(self) -> str:
        return {None: "", True: "met", False: "**missed**"}[self.met]


@dataclass(frozen=True)
class Section:
    """One benchmark's result: what was set up, its figures, and the raw measurements behind
    them (markdown table rows, first row the header). `error` is set when it failed to run."""

    key: str
    title: str
    setup: str
    figures: tuple[Figure, ...] = ()
    table: tuple[tuple[str, ...], ...] = ()
    notes: tuple[str, ...] = ()
    error: str | None = None
    duration_s: float = field(default=0.0, compare=False)

    @property
    def missed(self) -> tuple[Figure, ...]:
        return tuple(f for f in self.figures if f.met is False)
