"""Run the GPU check: every step in its own process under its own limit, then one summary.

A step that fails or overruns is recorded with the end of its output and the check goes on to
the next one; the exit code is 1 if any step failed or timed out, 0 otherwise (skips included:
on a machine without CUDA every step skips, and says why).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tandem.loadtest.gpu.report import Outcome, StepReport, Table, render_summary
from tandem.loadtest.gpu.steps import Skip, Step, StepFailed

SUMMARY_NAME = "gpu-check.md"
LOG_NAME = "gpu-check.log"
ERROR_TAIL_LINES = 30
NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): nothing to check on this machine"


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def environment() -> list[tuple[str, str]]:
    """The machine and the versions the figures depend on."""
    import torch

    env = [("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import triton

        env.append(("triton", triton.__version__))
    except ImportError as exc:
        env.append(("triton", f"not importable ({exc})"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.insert(0, ("GPU", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"))
        env.append(("CUDA", str(torch.version.cuda)))
        if torch.distributed.is_nccl_available():
            env.append(("NCCL", ".".join(str(v) for v in torch.cuda.nccl.version())))
    else:
        env.insert(0, ("GPU", "none"))
    return env


def run_step_here(target: str, work: Path) -> tuple[list[Table], str | None]:
    """Run one step ("module:function") in this process: its tables, or the reason it skipped."""
    module_name, function_name = target.split(":")
    module = importlib.import_module(module_name)
    function: Callable[[Path], list[Table]] = getattr(module, function_name)
    try:
        return function(work), None
    except Skip as skip:
        return [], str(skip)


def _tail(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_step(step: Step, work: Path, log: Callable[[str], None]) -> StepReport:
    """Run one step in a child process (its own session, so a timeout kills all it started)."""
    result_path = work / "result.json"
    argv = [sys.executable, "-m", "tandem.loadtest.gpu", "step", step.target, "--result", str(result_path)]
    argv += ["--work", str(work)]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=step.limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        seconds = time.monotonic() - start
        log(output)
        message = f"did not finish within its {step.limit_s:.0f} s limit; the end of its output:\n{_tail(output)}"
        return StepReport(step.name, step.title, Outcome.TIMED_OUT, seconds, step.limit_s, message=message)
    seconds = time.monotonic() - start
    log(output)
    if proc.returncode != 0 or not result_path.exists():
        message = f"exited with status {proc.returncode}; the end of its output:\n{_tail(output)}"
        return StepReport(step.name, step.title, Outcome.FAILED, seconds, step.limit_s, message=message)
    data = json.loads(result_path.read_text())
    tables = tuple(Table.from_dict(t) for t in data["tables"])
    if data.get("skipped") is not None:
        return StepReport(step.name, step.title, Outcome.SKIPPED, seconds, step.limit_s, tables, str(data["skipped"]))
    outcome = Outcome.FAILED if data.get("failed") else Outcome.PASSED
    return StepReport(step.name, step.title, outcome, seconds, step.limit_s, tables, str(data.get("failed") or ""))


def step_main(target: str, result: Path, work: Path) -> int:
    """The child's side: run the step and write its tables (or skip reason) as JSON."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        tables, skipped = run_step_here(target, work)
    except StepFailed as failed:
        tables, skipped = failed.tables, None
        result.write_text(json.dumps({"tables": [t.to_dict() for t in tables], "failed": str(failed)}))
        return 0
    result.write_text(json.dumps({"tables": [t.to_dict() for t in tables], "skipped": skipped}))
    return 0


def check_main(
    steps: Sequence[Step], out: Path | None, print_fn: Callable[[str], object] = print, *, have_cuda: bool | None = None
) -> int:
    """Run `steps` in order (all skipped without CUDA), print the summary and write it (and
    the steps' whole output) into `out` when given. Exit code 1 if any step failed."""
    env = environment()
    log_lines: list[str] = []
    reports: list[StepReport] = []
    have_cuda = cuda_available() if have_cuda is None else have_cuda
    with tempfile.TemporaryDirectory(prefix="tandem-gpu-check-") as scratch:
        for step in steps:
            if not have_cuda:
                reports.append(StepReport(step.name, step.title, Outcome.SKIPPED, 0.0, step.limit_s, message=NO_CUDA))
                continue
            print_fn(f"gpu-check: step {step.name} (limit {step.limit_s:.0f} s)")
            log_lines.append(f"===== step {step.name} =====")
            report = run_step(step, Path(scratch) / step.name, log_lines.append)
            print_fn(f"gpu-check: step {step.name} {report.outcome.value} in {report.seconds:.1f} s")
            reports.append(report)
    gpu = dict(env)["GPU"].split(",")[0]
    heading = f"GPU check on {gpu}" if have_cuda else "GPU check (no CUDA device)"
    summary = render_summary(heading, env, reports)
    print_fn(summary)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY_NAME).write_text(summary)
        (out / LOG_NAME).write_text("\n".join(log_lines) + "\n")
    return 1 if any(r.outcome in (Outcome.FAILED, Outcome.TIMED_OUT) for r in reports) else 0
