"""loadtest plots and comparisons: exact mean requests in flight, exact ECDF points, PNGs of the
exact pixel size, the exact side-by-side table of two saved runs, and the errors of `compare`
and of a bad `--concurrency` list (exit 2, also through `tandem bench serve`)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from matplotlib.image import imread

from tandem.loadtest.__main__ import concurrency_levels, main
from tandem.loadtest.metrics import mean_in_flight, summarize
from tandem.loadtest.plots import LATENCY_CDF_SIZE_PX, THROUGHPUT_SIZE_PX, ecdf, latencies_ms, write_plots
from tandem.loadtest.record import ErrorKind, RequestRecord
from tandem.loadtest.report import RunInfo, SavedRun, compare_markdown, load_results, write_results
from tandem.loadtest.slo import SLO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; asserts the PNG signature first."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def record(
    request_id: str,
    start_s: float,
    token_times_s: tuple[float, ...],
    end_s: float,
    output_tokens: int,
    error: ErrorKind | None = None,
) -> RequestRecord:
    return RequestRecord(
        request_id,
        start_s,
        end_s,
        token_times_s,
        prompt_tokens=10,
        output_tokens=output_tokens,
        error=error,
        http_status=503 if error else 200,
    )


# Binary-exact timings. Run X: closed loop, concurrency 1, two requests back to back.
X_RECORDS = (record("a", 0.0, (0.125, 0.25, 0.375, 0.5), 0.5, 4), record("b", 0.5, (0.75, 1.25), 1.5, 2))
# Run Y: open loop; c has one token (no TPOT), d failed, e has two tokens.
Y_RECORDS = (
    record("c", 0.0, (0.25,), 0.25, 1),
    record("d", 0.5, (), 0.5, 0, error=ErrorKind.HTTP_5XX),
    record("e", 0.5, (0.75, 1.0), 1.0, 2),
)


def info(load: str, slo: str | None, concurrency: int | None) -> RunInfo:
    return RunInfo(
        base_url="http://test",
        model="tiny",
        endpoint="/v1/completions",
        workload="w.yaml",
        num_requests=2,
        seed=0,
        load=load,
        slo=slo,
        concurrency=concurrency,
    )


def save(path: Path, run_info: RunInfo, records: tuple[RequestRecord, ...], duration_s: float) -> Path:
    slo = None if run_info.slo is None else SLO.parse(run_info.slo)
    write_results(path, run_info, summarize(records, duration_s, slo), records, ["default"] * len(records))
    return path


@pytest.fixture
def saved_runs(tmp_path: Path) -> tuple[Path, Path]:
    return (
        save(tmp_path / "x.json", info("concurrency 1", "ttft=300", 1), X_RECORDS, 1.5),
        save(tmp_path / "y.json", info("constant @ 2 req/s", None, None), Y_RECORDS, 1.0),
    )


def test_mean_in_flight_is_sum_of_e2e_over_duration() -> None:
    # E2E 0.25 + 0 (failed, still counted) + 0.5 over 1 s.
    assert mean_in_flight(Y_RECORDS, 1.0) == 0.75
    assert mean_in_flight(X_RECORDS, 1.5) == 1.0  # back to back: exactly one in flight
    assert mean_in_flight((), 2.0) == 0.0
    with pytest.raises(ValueError, match="positive duration_s"):
        mean_in_flight(X_RECORDS, 0.0)


def test_saved_run_concurrency_is_closed_loop_level_else_mean_in_flight() -> None:
    closed = SavedRun(info("concurrency 4", None, 4), 2.0, Y_RECORDS, ("default",) * 3)
    open_loop = SavedRun(info("poisson @ 1 req/s", None, None), 2.0, Y_RECORDS, ("default",) * 3)
    assert (closed.concurrency, open_loop.concurrency) == (4.0, 0.375)


def test_ecdf_and_latencies_exact() -> None:
    assert ecdf([3.0, 1.0, 2.0, 2.0]) == ([1.0, 2.0, 2.0, 3.0], [0.25, 0.5, 0.75, 1.0])
    assert ecdf([]) == ([], [])
    # Failed d is left out; c has no TPOT and no gap.
    assert latencies_ms(Y_RECORDS) == {"TTFT": [250.0, 250.0], "TPOT": [250.0], "ITL": [250.0], "E2E": [250.0, 500.0]}


def test_plots_are_pngs_of_the_set_size(saved_runs: tuple[Path, Path], tmp_path: Path) -> None:
    runs = [load_results(path) for path in saved_runs]
    cdf, throughput = write_plots(tmp_path, runs, ["x", "y"])
    assert (cdf, throughput) == (tmp_path / "latency_cdf.png", tmp_path / "throughput.png")
    assert png_size(cdf) == LATENCY_CDF_SIZE_PX
    assert png_size(throughput) == THROUGHPUT_SIZE_PX
    assert imread(cdf).shape[:2] == (LATENCY_CDF_SIZE_PX[1], LATENCY_CDF_SIZE_PX[0])
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        write_plots(tmp_path, runs, ["x"])


X_COLUMN_Y_COLUMN = """\
| metric | concurrency 1 | constant @ 2 req/s |
|---|---|---|
| load | concurrency 1 | constant @ 2 req/s |
| requests in flight | 1.00 | 0.75 |
| requests ok / errors | 2 / 0 | 2 / 1 |
| request throughput (req/s) | 1.333 | 2.000 |
| output token throughput (tok/s) | 4.00 | 3.00 |
| TTFT p50 (ms) | 187.50 | 250.00 |
| TTFT p90 (ms) | 237.50 | 250.00 |
| TTFT p99 (ms) | 248.75 | 250.00 |
| TPOT p50 (ms) | 437.50 | 250.00 |
| TPOT p99 (ms) | 743.75 | 250.00 |
| ITL p99 (ms) | 488.75 | 250.00 |
| E2E p99 (ms) | 995.00 | 497.50 |
"""
FOOTER = (
    "\nRequests in flight: the closed-loop concurrency, or for an open-loop run the mean reached "
    "(sum of E2E / duration). Latencies of successful requests only.\n"
)


def test_compare_table_exact(saved_runs: tuple[Path, Path]) -> None:
    runs = [load_results(path) for path in saved_runs]
    labels = ["concurrency 1", "constant @ 2 req/s"]
    own_slo = "| SLO | ttft=300 | - |\n| goodput (req/s) | 1.333 | - |\n| goodput (% of requests) | 100.0% | - |\n"
    assert compare_markdown("T", runs, labels) == "# T\n\n" + X_COLUMN_Y_COLUMN + own_slo + FOOTER
    # --slo overrides each run's own: x meets e2e=600 with a only, y with c and e.
    override = (
        "| SLO | e2e=600 | e2e=600 |\n| goodput (req/s) | 0.667 | 2.000 |\n"
        "| goodput (% of requests) | 50.0% | 66.7% |\n"
    )
    overridden = compare_markdown("T", runs, labels, SLO.parse("e2e=600"))
    assert overridden == "# T\n\n" + X_COLUMN_Y_COLUMN + override + FOOTER
    without_slo = [SavedRun(info("concurrency 1", None, 1), 1.5, X_RECORDS, ("default",) * 2), runs[1]]
    assert compare_markdown("T", without_slo, labels) == "# T\n\n" + X_COLUMN_Y_COLUMN + FOOTER


def test_cli_compare_prints_and_writes(
    saved_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, saved_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Load test comparison\n\n" + X_COLUMN_Y_COLUMN)
    assert (out / "compare.md").read_text() + "\n" == printed
    assert png_size(out / "latency_cdf.png") == LATENCY_CDF_SIZE_PX
    assert png_size(out / "throughput.png") == THROUGHPUT_SIZE_PX
    # Same load twice: the columns are named by file instead; --labels names them explicitly.
    assert main(["compare", str(saved_runs[0]), str(saved_runs[0])]) == 0
    assert f"| metric | {saved_runs[0]} | {saved_runs[0]} |" in capsys.readouterr().out
    assert main(["compare", *map(str, saved_runs), "--labels", "before, after"]) == 0
    assert "| metric | before | after |\n" in capsys.readouterr().out


def test_cli_compare_errors(saved_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.json"
    assert main(["compare", str(saved_runs[0]), str(missing)]) == 2
    assert capsys.readouterr().err == f"error: cannot read {missing}: No such file or directory.\n"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["compare", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bad} is not JSON (")
    old = tmp_path / "old.json"
    old.write_text('{"version": 0}')
    assert main(["compare", str(old)]) == 2
    assert "unsupported results version 0" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "requests": []}')
    assert main(["compare", str(broken)]) == 2
    assert capsys.readouterr().err == f"error: {broken}: malformed results.json (KeyError: 'run').\n"
    assert main(["compare", *map(str, saved_runs), "--labels", "one"]) == 2
    assert capsys.readouterr().err == "error: 1 labels for 2 runs.\n"
    assert main(["compare", *map(str, saved_runs), "--slo", "itl=5"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["compare"])
    assert exit_info.value.code == 2


def test_concurrency_levels() -> None:
    assert concurrency_levels("8") == (8,)
    assert concurrency_levels("1,4,16") == (1, 4, 16)
    assert concurrency_levels("16, 4") == (16, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "--concurrency levels must be >= 1, got '0'."),
        ("1,-4", "--concurrency levels must be >= 1, got '1,-4'."),
        ("a,2", "--concurrency must be a positive integer or a comma-separated list of them (e.g. 1,4,16), got 'a,2'."),
        ("", "--concurrency must be a positive integer or a comma-separated list of them (e.g. 1,4,16), got ''."),
        ("1,", "--concurrency must be a positive integer or a comma-separated list of them (e.g. 1,4,16), got '1,'."),
        ("4,4", "--concurrency lists a level twice: '4,4'."),
    ],
)
def test_bad_concurrency_lists_exit_2(text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError) as error:
        concurrency_levels(text)
    assert str(error.value) == message
    flags = [
        "--base-url",
        "http://127.0.0.1:9",
        "--model",
        "m",
        "--workload",
        "w.yaml",
        "--num-requests",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--concurrency",
        text,
    ]
    assert main(["run", *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    from tandem.cli import main as tandem_main

    with pytest.raises(SystemExit) as exit_info:  # `tandem bench serve` is `python -m tandem.loadtest run`
        tandem_main(["bench", "serve", *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()  # nothing was run


def test_tandem_bench_flags_before_serve_are_refused(capsys: pytest.CaptureFixture) -> None:
    from tandem.cli import main as tandem_main

    with pytest.raises(SystemExit) as exit_info:
        tandem_main(["bench", "--model", "m", "serve"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "tandem: error: put the load generator's flags after `serve`: tandem bench serve --base-url URL ...\n"
    )
