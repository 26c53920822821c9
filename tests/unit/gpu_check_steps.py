"""Steps for tests/unit/test_gpu_check.py: each behaves one way, and runs in a child process
(`python -m tandem.loadtest.gpu step tests.unit.gpu_check_steps:NAME`)."""

from __future__ import annotations

import time
from pathlib import Path

from tandem.loadtest.gpu.report import Table
from tandem.loadtest.gpu.steps import Skip, StepFailed

FIGURES = Table("figures", ("case", "GB/s"), (("a", "1.5"), ("b", "2.0")), ("one note",))


def passes(work: Path) -> list[Table]:
    (work / "touched").write_text("yes")
    return [FIGURES]


def skips(work: Path) -> list[Table]:
    raise Skip("needs two GPUs; this machine has one")


def raises(work: Path) -> list[Table]:
    print("about to fail")
    raise RuntimeError("the kernel returned NaN")


def check_fails(work: Path) -> list[Table]:
    raise StepFailed("2 of 3 requests differ from the engine", [FIGURES])


def hangs(work: Path) -> list[Table]:
    print("hanging now", flush=True)
    time.sleep(120)
    return []
