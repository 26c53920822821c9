"""Step `tests` of the GPU check: every gpu-marked test, and the kernel tests compiled on CUDA.

The step runs pytest in child processes from the repository root (the current directory:
deploy/gpu/check.sh cd's there; the project itself is imported from its installed copy).
Each child writes a junit XML report into the step's work folder; the reports become two
tables, the tests per file and the failed tests with the first lines of their messages.

The runs (`plan_runs`), which together cover every gpu-marked test and every non-gpu test of
tests/kernels (on CUDA those run compiled: tests/kernels/conftest.py):
1. the gpu-marked tests outside tests/kernels (`-m gpu`);
2. one run per test file of tests/kernels with all its tests, so that a file's gpu-marked
   tests reuse the kernels its other tests compiled.
The time goes mostly into compiling kernels, one CPU core per process, so up to
`max_parallel()` runs go at once. Every test has TEST_TIMEOUT_S, cut to what is left before
the step's deadline when its run starts; every run stops between tests at the deadline
(pytest-timeout's --session-timeout), so its report is still written, and is killed just after.
"""

from __future__ import annotations

import enum
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tandem.loadtest.gpu.report import Table
from tandem.loadtest.gpu.steps import Skip, StepFailed, step_named

NO_CUDA = (
    "no CUDA device here (torch.cuda.is_available() is False): "
    "the gpu-marked tests and the compiled kernel tests need one"
)
TEST_TIMEOUT_S = 60.0  # one test, compiling its kernels included
DEADLINE_RESERVE_S = 10.0  # of the step's limit, kept for reading the reports and writing tables
KILL_GRACE_S = 5.0  # after its session timeout, a run still going is killed
MESSAGE_LINES = 3
MESSAGE_CHARS = 300


class CaseOutcome(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    ERROR = "error"


@dataclass(frozen=True)
class CaseResult:
    """One junit testcase: `nodeid` as pytest prints it, `message` the first lines of a
    failure, error or skip reason ("" for a pass)."""

    file: str
    nodeid: str
    outcome: CaseOutcome
    seconds: float
    message: str = ""


@dataclass(frozen=True)
class PytestRun:
    name: str  # a short label: the file it runs, or "gpu-marked outside tests/kernels"
    args: tuple[str, ...]  # paths and selection, relative to the repository root


@dataclass(frozen=True)
class RunOutcome:
    """A finished (or killed) run: `exit_code` None when killed at the deadline or never started."""

    run: PytestRun
    exit_code: int | None
    results: tuple[CaseResult, ...]
    problem: str = ""  # why the run itself failed ("" when pytest ran to its end)


def repo_root(cwd: Path) -> Path:
    if not (cwd / "tests").is_dir():
        raise Skip(f"{cwd} has no tests/ folder: run the GPU check from the repository root (deploy/gpu/check.sh does)")
    return cwd


GPU_MARK = "pytest.mark.gpu"


def plan_runs(root: Path) -> list[PytestRun]:
    """The gpu-marked test files outside tests/kernels (one run, if any), then the kernel test
    files, largest first (a rough order of their compile time). Only files that carry the mark
    are collected outside tests/kernels: collecting the rest would import packages the GPU
    image lacks (the Helm engine, grpc-tools, ray) for tests that do not run there."""
    tests = root / "tests"
    kernel_files = sorted((tests / "kernels").glob("test_*.py"), key=lambda p: (-p.stat().st_size, p.name))
    marked = sorted(
        p.relative_to(root).as_posix()
        for p in tests.rglob("test_*.py")
        if (tests / "kernels") not in p.parents and GPU_MARK in p.read_text(encoding="utf-8")
    )
    runs = [PytestRun("gpu-marked outside tests/kernels", (*marked, "-m", "gpu"))] if marked else []
    for path in kernel_files:
        rel = path.relative_to(root).as_posix()
        runs.append(PytestRun(rel, (rel, "-m", "gpu or not gpu")))
    return runs


def pytest_argv(
    run: PytestRun, junit: Path, basetemp: Path, test_timeout_s: float | None, session_timeout_s: float | None
) -> list[str]:
    """The child's command line; a timeout of None leaves out its flag (no pytest-timeout)."""
    # -v names each test before it runs: the end of a killed run's output says which hung
    argv = [sys.executable, "-m", "pytest", *run.args, "-v", "-p", "no:cacheprovider"]
    argv += [f"--junitxml={junit}", "-o", "junit_family=xunit1", f"--basetemp={basetemp}"]
    argv.append("--continue-on-collection-errors")
    if test_timeout_s is not None:
        argv.append(f"--timeout={max(1, int(test_timeout_s))}")
    if session_timeout_s is not None:
        argv.append(f"--session-timeout={max(1, int(session_timeout_s))}")
    return argv


def timeout_flags() -> tuple[bool, bool]:
    """(per-test timeout available, session timeout available) from pytest-timeout's version."""
    try:
        version = tuple(int(part) for part in metadata.version("pytest-timeout").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False, False
    return True, version >= (2, 3)


def first_lines(text: str, lines: int = MESSAGE_LINES, chars: int = MESSAGE_CHARS) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()][:lines]
    joined = " / ".join(kept)
    return joined if len(joined) <= chars else joined[: chars - 3] + "..."


def _nodeid(file: str, classname: str, name: str) -> str:
    if not classname:  # a collection error: the name is the module
        return file
    module = file.removesuffix(".py").replace("/", ".")
    classes = classname[len(module) + 1 :] if classname.startswith(module + ".") else ""
    return "::".join(part for part in (file, classes.replace(".", "::"), name) if part)


def parse_junit(xml_text: str) -> list[CaseResult]:
    """The testcases of a pytest junit report (junit_family=xunit1, which names each file)."""
    results = []
    for case in ET.fromstring(xml_text).iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        file = case.get("file") or classname.replace(".", "/") + ".py"
        outcome, message = CaseOutcome.PASSED, ""
        for tag, kind in (
            ("failure", CaseOutcome.FAILED),
            ("error", CaseOutcome.ERROR),
            ("skipped", CaseOutcome.SKIPPED),
        ):
            element = case.find(tag)
            if element is not None:
                outcome = kind
                message = first_lines(element.get("message") or element.text or "")
                break
        results.append(CaseResult(file, _nodeid(file, classname, name), outcome, float(case.get("time", 0)), message))
    return results


def file_table(results: Sequence[CaseResult], notes: Sequence[str] = ()) -> Table:
    """Counts and seconds per test file, files in name order, then a total row."""
    counts: dict[str, dict[CaseOutcome, int]] = {}
    seconds: dict[str, float] = {}
    for r in results:
        counts.setdefault(r.file, dict.fromkeys(CaseOutcome, 0))[r.outcome] += 1
        seconds[r.file] = seconds.get(r.file, 0.0) + r.seconds
    order = (CaseOutcome.PASSED, CaseOutcome.FAILED, CaseOutcome.SKIPPED, CaseOutcome.ERROR)
    rows = [(f, *(str(counts[f][o]) for o in order), f"{seconds[f]:.1f}") for f in sorted(counts)]
    totals = tuple(str(sum(1 for r in results if r.outcome is o)) for o in order)
    rows.append(("total", *totals, f"{sum(seconds.values()):.1f}"))
    headers = ("file", "passed", "failed", "skipped", "errors", "seconds")
    return Table("Tests per file", headers, tuple(rows), tuple(notes))


def failure_table(outcomes: Sequence[RunOutcome]) -> Table | None:
    """A row per failed or erroring test, then one per run that did not end normally."""
    rows = [
        (r.nodeid, r.outcome.value, r.message)
        for o in outcomes
        for r in o.results
        if r.outcome in (CaseOutcome.FAILED, CaseOutcome.ERROR)
    ]
    rows += [(o.run.name, "run", o.problem) for o in outcomes if o.problem]
    return Table("Failed tests", ("test", "outcome", "message"), tuple(rows)) if rows else None


def tables_for(outcomes: Sequence[RunOutcome], notes: Sequence[str] = ()) -> list[Table]:
    """The step's tables; raises StepFailed (with them) when a test or a run failed."""
    results = [r for o in outcomes for r in o.results]
    per_file = file_table(results, notes)
    failures = failure_table(outcomes)
    if failures is None:
        return [per_file]
    failed = sum(1 for r in results if r.outcome in (CaseOutcome.FAILED, CaseOutcome.ERROR))
    message = f"{failed} of {len(results)} tests failed"
    broken = [o.run.name for o in outcomes if o.problem]
    if broken:
        message += f"; runs that did not end normally: {', '.join(broken)}"
    raise StepFailed(message, [per_file, failures])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.removesuffix(".py")).strip("-")


def _finish(run: PytestRun, exit_code: int | None, junit: Path, log: Path, problem: str) -> RunOutcome:
    results = tuple(parse_junit(junit.read_text())) if junit.exists() else ()
    if not problem and exit_code not in (0, 1, 5):  # 5: nothing collected
        problem = f"pytest exited with status {exit_code}"
    if problem and log.exists():  # with -v, a hung run's last line names the test it was in
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        problem += f"; the end of its output: {first_lines(last[0]) if last else '(none)'}"
    return RunOutcome(run, exit_code, results, problem)


def run_all(root: Path, work: Path, runs: Sequence[PytestRun], deadline_s: float, parallel: int) -> list[RunOutcome]:
    """Run `runs` from `root`, `parallel` at a time, until `deadline_s` (time.monotonic()).

    Children stay in this process's group, so the check's kill of a step that overruns reaches
    them too. TRITON_INTERPRET is dropped from their environment: kernels must run compiled.
    """
    test_timeout, session_timeout = timeout_flags()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    pending = list(runs)
    running: dict[PytestRun, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    outcomes: dict[PytestRun, RunOutcome] = {}
    while pending or running:
        while pending and len(running) < parallel and time.monotonic() < deadline_s - KILL_GRACE_S:
            run = pending.pop(0)
            junit, log = work / f"junit-{_slug(run.name)}.xml", work / f"pytest-{_slug(run.name)}.log"
            junit.unlink(missing_ok=True)
            left_s = deadline_s - time.monotonic() - KILL_GRACE_S
            (work / "tmp").mkdir(exist_ok=True)  # pytest makes --basetemp, not its parents
            argv = pytest_argv(
                run,
                junit,
                work / "tmp" / _slug(run.name),
                min(TEST_TIMEOUT_S, left_s) if test_timeout else None,
                left_s if session_timeout else None,
            )
            with log.open("wb") as out:
                running[run] = (
                    subprocess.Popen(argv, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT),
                    junit,
                    log,
                )
        for run, (proc, junit, log) in list(running.items()):
            if proc.poll() is not None:
                outcomes[run] = _finish(run, proc.returncode, junit, log, "")
                del running[run]
            elif time.monotonic() >= deadline_s:
                proc.kill()
                proc.wait()
                outcomes[run] = _finish(run, None, junit, log, "killed at the step's deadline")
                del running[run]
        if pending and not running and time.monotonic() >= deadline_s - KILL_GRACE_S:
            for run in pending:
                outcomes[run] = RunOutcome(run, None, (), "not started: the step's deadline came first")
            pending.clear()
        time.sleep(0.2)
    return [outcomes[run] for run in runs]


def max_parallel() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def run(work: Path) -> list[Table]:
    start = time.monotonic()
    import torch

    if not torch.cuda.is_available():
        raise Skip(NO_CUDA)
    root = repo_root(Path.cwd())
    deadline_s = start + step_named("tests").limit_s - DEADLINE_RESERVE_S
    work.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(root)
    parallel = max_parallel()
    outcomes = run_all(root, work, runs, deadline_s, parallel)
    notes = [
        f"{len(runs)} pytest runs ({runs[0].name}; then each file of tests/kernels), {parallel} at a time, "
        f"in {time.monotonic() - start:.0f} s; per-test timeout {TEST_TIMEOUT_S:.0f} s",
    ]
    return tables_for(outcomes, notes)
