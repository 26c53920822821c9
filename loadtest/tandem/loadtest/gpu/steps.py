"""The GPU check's steps, in the order they run, each with its own time limit.

A step is a function `run(work: Path) -> list[Table]` named as "module:function"; `work` is a
scratch folder of its own. It raises `Skip` when its precondition does not hold (the reason is
printed), and anything else it raises is a failure. The limits add up to the issue's budget:
at most 8 minutes for the whole check from a bare machine, the install (~30 s) included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tandem.loadtest.gpu.report import Table


class Skip(Exception):
    """A step's precondition does not hold here; the message says which and why."""


class StepFailed(Exception):
    """A step ran to its end but what it measured fails its check (wrong tokens, failed tests):
    its tables still go into the summary, beside the message."""

    def __init__(self, message: str, tables: Sequence[Table]) -> None:
        super().__init__(message)
        self.tables = list(tables)


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    target: str  # "module:function"
    limit_s: float


STEPS: tuple[Step, ...] = (
    Step(
        "tests",
        "gpu-marked tests (compiled kernels, Triton backend vs torch and transformers)",
        "tandem.loadtest.gpu.step_tests:run",
        150.0,
    ),
    Step(
        "kernels",
        "tandem bench kernels (decode bandwidth, prefill TFLOP/s)",
        "tandem.loadtest.bench.kernels:gpu_check",
        90.0,
    ),
    Step(
        "handoff",
        "KV hand-off between two processes on one GPU (NCCL, gRPC)",
        "tandem.loadtest.gpu.step_handoff:run",
        60.0,
    ),
    Step(
        "cluster",
        "tandem up with the Triton backend: 64 streams through the gateway",
        "tandem.loadtest.gpu.step_cluster:run",
        150.0,
    ),
)
TOTAL_LIMIT_S = 480.0  # the budget, install included
STEP_NAMES = tuple(step.name for step in STEPS)


def step_named(name: str) -> Step:
    for step in STEPS:
        if step.name == name:
            return step
    raise ValueError(f"no GPU-check step named {name!r}; the steps are {', '.join(STEP_NAMES)}")
