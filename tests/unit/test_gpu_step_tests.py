"""The GPU check's `tests` step: junit reports to tables, the pytest runs it plans and starts,
and its skip on a machine without CUDA."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tandem.loadtest.gpu import step_tests
from tandem.loadtest.gpu.report import Table
from tandem.loadtest.gpu.step_tests import (
    CaseOutcome,
    CaseResult,
    PytestRun,
    RunOutcome,
    failure_table,
    file_table,
    first_lines,
    parse_junit,
    plan_runs,
    pytest_argv,
    repo_root,
    run_all,
    tables_for,
)
from tandem.loadtest.gpu.steps import Skip, StepFailed

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="2" failures="2" skipped="1" tests="7">
<testcase classname="" name="tests.unit.test_gone" file="tests/unit/test_gone.py" time="0.000">
<error message="collection failure">ImportError while importing test module
E   ModuleNotFoundError: No module named 'gone'</error></testcase>
<testcase classname="tests.kernels.test_a" name="test_ok" file="tests/kernels/test_a.py" line="3" time="1.250" />
<testcase classname="tests.kernels.test_a" name="test_far[dtype0]" file="tests/kernels/test_a.py" line="9"
 time="2.500"><failure message="AssertionError: Tensor-likes are not close!&#10;&#10;Mismatched elements: 3 / 64&#10;
Greatest absolute difference: 0.5&#10;Greatest relative difference: 1.0">long traceback</failure></testcase>
<testcase classname="tests.kernels.test_a.TestGroup" name="test_in_class" file="tests/kernels/test_a.py" line="20"
 time="0.250" />
<testcase classname="tests.kernels.test_b" name="test_needs_cuda" file="tests/kernels/test_b.py" line="5"
 time="0.000"><skipped type="pytest.skip" message="needs CUDA">tests/kernels/test_b.py:5: needs CUDA</skipped>
</testcase>
<testcase classname="tests.kernels.test_b" name="test_setup" file="tests/kernels/test_b.py" line="8" time="0.100">
<error message="failed on setup with &quot;RuntimeError: no model&quot;">trace</error></testcase>
<testcase classname="tests.kernels.test_b" name="test_hang" file="tests/kernels/test_b.py" line="12" time="60.000">
<failure message="Failed: Timeout (&gt;60.0s) from pytest-timeout.">trace</failure></testcase>
</testsuite></testsuites>
"""

FAILED_MESSAGE = (
    "AssertionError: Tensor-likes are not close! / Mismatched elements: 3 / 64 / Greatest absolute difference: 0.5"
)
RESULTS = [
    CaseResult(
        "tests/unit/test_gone.py",
        "tests/unit/test_gone.py",
        CaseOutcome.ERROR,
        0.0,
        "collection failure",
    ),
    CaseResult("tests/kernels/test_a.py", "tests/kernels/test_a.py::test_ok", CaseOutcome.PASSED, 1.25),
    CaseResult(
        "tests/kernels/test_a.py",
        "tests/kernels/test_a.py::test_far[dtype0]",
        CaseOutcome.FAILED,
        2.5,
        FAILED_MESSAGE,
    ),
    CaseResult(
        "tests/kernels/test_a.py", "tests/kernels/test_a.py::TestGroup::test_in_class", CaseOutcome.PASSED, 0.25
    ),
    CaseResult(
        "tests/kernels/test_b.py",
        "tests/kernels/test_b.py::test_needs_cuda",
        CaseOutcome.SKIPPED,
        0.0,
        "needs CUDA",
    ),
    CaseResult(
        "tests/kernels/test_b.py",
        "tests/kernels/test_b.py::test_setup",
        CaseOutcome.ERROR,
        0.1,
        'failed on setup with "RuntimeError: no model"',
    ),
    CaseResult(
        "tests/kernels/test_b.py",
        "tests/kernels/test_b.py::test_hang",
        CaseOutcome.FAILED,
        60.0,
        "Failed: Timeout (>60.0s) from pytest-timeout.",
    ),
]
FILE_ROWS = (
    ("tests/kernels/test_a.py", "2", "1", "0", "0", "4.0"),
    ("tests/kernels/test_b.py", "0", "1", "1", "1", "60.1"),
    ("tests/unit/test_gone.py", "0", "0", "0", "1", "0.0"),
    ("total", "2", "2", "1", "2", "64.1"),
)
FILE_HEADERS = ("file", "passed", "failed", "skipped", "errors", "seconds")
GPU_RUN = PytestRun("gpu-marked outside tests/kernels", ("tests/e2e/test_marked.py", "-m", "gpu"))


def test_parse_junit_reads_every_outcome_and_the_first_lines_of_each_message() -> None:
    assert parse_junit(JUNIT) == RESULTS


def test_first_lines_keeps_three_nonblank_lines_and_caps_the_length() -> None:
    assert first_lines("a\n\n  b  \nc\nd") == "a / b / c"
    assert first_lines("x" * 400) == "x" * 297 + "..."
    assert first_lines("") == ""


def test_file_table_counts_per_file_then_a_total() -> None:
    assert file_table(RESULTS, ["a note"]) == Table("Tests per file", FILE_HEADERS, FILE_ROWS, ("a note",))


def test_failure_table_has_a_row_per_failed_test_then_per_broken_run() -> None:
    outcomes = [
        RunOutcome(GPU_RUN, 1, tuple(RESULTS[:3])),
        RunOutcome(PytestRun("tests/kernels/test_b.py", ()), None, (), "killed at the step's deadline: test_x"),
    ]
    assert failure_table(outcomes) == Table(
        "Failed tests",
        ("test", "outcome", "message"),
        (
            ("tests/unit/test_gone.py", "error", "collection failure"),
            ("tests/kernels/test_a.py::test_far[dtype0]", "failed", FAILED_MESSAGE),
            ("tests/kernels/test_b.py", "run", "killed at the step's deadline: test_x"),
        ),
    )
    assert failure_table([RunOutcome(GPU_RUN, 0, (RESULTS[1],))]) is None


def test_tables_for_returns_the_file_table_when_everything_passed() -> None:
    outcomes = [RunOutcome(GPU_RUN, 0, (RESULTS[1], RESULTS[3])), RunOutcome(GPU_RUN, 5, ())]
    rows = (("tests/kernels/test_a.py", "2", "0", "0", "0", "1.5"), ("total", "2", "0", "0", "0", "1.5"))
    assert tables_for(outcomes, ["n"]) == [Table("Tests per file", FILE_HEADERS, rows, ("n",))]


def test_tables_for_raises_step_failed_with_both_tables() -> None:
    broken = RunOutcome(
        PytestRun("tests/kernels/test_c.py", ()), None, (), "not started: the step's deadline came first"
    )
    with pytest.raises(StepFailed) as info:
        tables_for([RunOutcome(GPU_RUN, 1, tuple(RESULTS)), broken])
    assert str(info.value) == "4 of 7 tests failed; runs that did not end normally: tests/kernels/test_c.py"
    assert [t.title for t in info.value.tables] == ["Tests per file", "Failed tests"]
    assert info.value.tables[0].rows == FILE_ROWS
    assert len(info.value.tables[1].rows) == 5


def test_plan_runs_puts_marked_files_first_then_kernel_files_largest_first(tmp_path: Path) -> None:
    kernels = tmp_path / "tests" / "kernels"
    kernels.mkdir(parents=True)
    (kernels / "test_small.py").write_text("x = 1\n")
    (kernels / "test_large.py").write_text("x = 1\n" * 10)
    (kernels / "test_also_small.py").write_text("y = 1\n")
    (kernels / "conftest.py").write_text("x = 1\n" * 100)
    kernel_runs = plan_runs(tmp_path)
    (tmp_path / "tests" / "e2e").mkdir()
    (tmp_path / "tests" / "e2e" / "test_marked.py").write_text("@pytest.mark.gpu\ndef test_x(): pass\n")
    (tmp_path / "tests" / "e2e" / "test_unmarked.py").write_text("import helm\n")
    assert plan_runs(tmp_path) == [GPU_RUN, *kernel_runs]
    assert kernel_runs == [
        PytestRun("tests/kernels/test_large.py", ("tests/kernels/test_large.py", "-m", "gpu or not gpu")),
        PytestRun("tests/kernels/test_also_small.py", ("tests/kernels/test_also_small.py", "-m", "gpu or not gpu")),
        PytestRun("tests/kernels/test_small.py", ("tests/kernels/test_small.py", "-m", "gpu or not gpu")),
    ]


def test_pytest_argv_writes_xunit1_junit_with_timeouts(tmp_path: Path) -> None:
    junit, temp = tmp_path / "j.xml", tmp_path / "t"
    common = [step_tests.sys.executable, "-m", "pytest", "tests/e2e/test_marked.py", "-m", "gpu", "-v"]
    common += ["-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit1", f"--basetemp={temp}"]
    common += ["--continue-on-collection-errors"]
    assert pytest_argv(GPU_RUN, junit, temp, 60.0, 129.7) == [*common, "--timeout=60", "--session-timeout=129"]
    assert pytest_argv(GPU_RUN, junit, temp, 0.4, None) == [*common, "--timeout=1"]
    assert pytest_argv(GPU_RUN, junit, temp, None, None) == common


def test_repo_root_needs_a_tests_folder(tmp_path: Path) -> None:
    with pytest.raises(Skip) as info:
        repo_root(tmp_path)
    assert str(info.value) == (
        f"{tmp_path} has no tests/ folder: run the GPU check from the repository root (deploy/gpu/check.sh does)"
    )
    (tmp_path / "tests").mkdir()
    assert repo_root(tmp_path) == tmp_path


def test_run_skips_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(Skip) as info:
        step_tests.run(tmp_path / "work")
    assert str(info.value) == (
        "no CUDA device here (torch.cuda.is_available() is False): "
        "the gpu-marked tests and the compiled kernel tests need one"
    )
    assert not (tmp_path / "work").exists()


# ---- run_all on a small project of its own: real pytest children --------------------------

FINE = """
import pytest

def test_ok(tmp_path):
    assert tmp_path.is_dir()

@pytest.mark.gpu
def test_gpu_ok():
    pass

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass
"""
BROKEN = """
class TestBits:
    def test_wrong(self):
        assert 1 + 1 == 3, "arithmetic\\nis hard"
"""
ELSEWHERE = """
import pytest

@pytest.mark.gpu
def test_gpu_elsewhere():
    pass

def test_not_gpu():
    raise AssertionError("never selected")
"""
HANG = """
import signal
import time

def test_hang():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # pytest-timeout cannot stop it
    time.sleep(60)
"""


def _project(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _without_seconds(outcome: RunOutcome) -> list[tuple[str, CaseOutcome, str]]:
    return [(r.nodeid, r.outcome, r.message) for r in outcome.results]


def test_run_all_runs_pytest_and_reads_each_report(tmp_path: Path) -> None:
    files = {"tests/kernels/test_fine.py": FINE, "tests/kernels/test_broken.py": BROKEN}
    root = _project(tmp_path / "repo", {**files, "tests/test_elsewhere.py": ELSEWHERE})
    work = tmp_path / "work"
    work.mkdir()
    runs = plan_runs(root)
    outcomes = run_all(root, work, runs, time.monotonic() + 120, parallel=2)
    assert [o.run for o in outcomes] == runs
    assert [(o.exit_code, o.problem) for o in outcomes] == [(0, ""), (0, ""), (1, "")]
    assert _without_seconds(outcomes[0]) == [("tests/test_elsewhere.py::test_gpu_elsewhere", CaseOutcome.PASSED, "")]
    assert _without_seconds(outcomes[1]) == [
        ("tests/kernels/test_fine.py::test_ok", CaseOutcome.PASSED, ""),
        ("tests/kernels/test_fine.py::test_gpu_ok", CaseOutcome.PASSED, ""),
        ("tests/kernels/test_fine.py::test_skipped", CaseOutcome.SKIPPED, "not here"),
    ]
    assert _without_seconds(outcomes[2]) == [
        (
            "tests/kernels/test_broken.py::TestBits::test_wrong",
            CaseOutcome.FAILED,
            "AssertionError: arithmetic / is hard / assert (1 + 1) == 3",
        )
    ]


def test_run_all_kills_a_hung_run_at_the_deadline_and_starts_no_more(tmp_path: Path) -> None:
    root = _project(tmp_path / "repo", {"tests/test_hang.py": HANG})
    work = tmp_path / "work"
    work.mkdir()
    hang = PytestRun("hang", ("tests/test_hang.py",))
    later = PytestRun("later", ("tests/test_hang.py",))
    start = time.monotonic()
    outcomes = run_all(root, work, [hang, later], start + 6, parallel=1)
    assert 6 <= time.monotonic() - start < 20
    assert outcomes == [
        RunOutcome(
            hang, None, (), "killed at the step's deadline; the end of its output: tests/test_hang.py::test_hang"
        ),
        RunOutcome(later, None, (), "not started: the step's deadline came first"),
    ]
