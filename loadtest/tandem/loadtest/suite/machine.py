"""The machine a benchmark run was measured on, for BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    num_cpus: int
    memory_gib: float
    os: str
    python: str
    torch: str
    commit: str
    gpu: str

    @classmethod
    def collect(cls, repo: Path) -> MachineInfo:
        import torch

        return cls(
            cpu_model=_cpu_model(),
            num_cpus=len(os.sched_getaffinity(0)),
            memory_gib=_memory_gib(),
            os=f"{platform.system()} {platform.release()}",
            python=platform.python_version(),
            torch=torch.__version__,
            commit=_commit(repo),
            gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        )

    def rows(self) -> tuple[tuple[str, str], ...]:
        return (
            ("CPU", f"{self.cpu_model}, {self.num_cpus} cores available"),
            ("memory", f"{self.memory_gib:.0f} GiB"),
            ("GPU", self.gpu),
            ("OS", self.os),
            ("Python / torch", f"{self.python} / {self.torch}"),
            ("commit", self.commit),
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _commit(repo: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{head}{' with uncommitted changes' if dirty else ''}"
