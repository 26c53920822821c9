"""Cost per token in the load generator's report: `--gpu-hour-cost` parsing, exact dollars per
million output tokens and per million tokens for a known run, the summary's rows, and the cost
surviving results.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.loadtest.__main__ import main
from tandem.loadtest.cost import GpuHourCost, TokenCost, dollars_per_million
from tandem.loadtest.metrics import summarize
from tandem.loadtest.record import ErrorKind, RequestRecord
from tandem.loadtest.report import RunInfo, load_results, summary_markdown, write_results


def record(request_id: str, prompt_tokens: int, output_tokens: int, error: ErrorKind | None = None) -> RequestRecord:
    times = tuple(0.25 * (i + 1) for i in range(output_tokens))
    return RequestRecord(
        request_id=request_id,
        start_s=0.0,
        end_s=times[-1] if times else 0.5,
        token_times_s=times,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        error=error,
        http_status=503 if error is ErrorKind.HTTP_5XX else 200,
    )


# Three successful requests (60 prompt + 8 output tokens) and one failure, which is not counted.
RUN = (record("a", 10, 4), record("b", 20, 2), record("c", 30, 2), record("d", 40, 0, ErrorKind.HTTP_5XX))
DURATION_S = 36.0


def info(cost: str | None) -> RunInfo:
    return RunInfo("http://127.0.0.1:8000", "tiny", "completions", "w.yaml", 4, 0, "concurrency 2", None, 2, cost)


@pytest.mark.parametrize(
    ("text", "pools", "per_hour"),
    [
        ("2.5", (("cluster", 2.5),), 2.5),
        ("prefill=2.5,decode=2.5", (("prefill", 2.5), ("decode", 2.5)), 5.0),
        (" prefill = 1.25 , decode=3 ", (("prefill", 1.25), ("decode", 3.0)), 4.25),
        ("decode=0", (("decode", 0.0),), 0.0),
    ],
)
def test_parse(text: str, pools: tuple[tuple[str, float], ...], per_hour: float) -> None:
    cost = GpuHourCost.parse(text)
    assert cost.pools == pools
    assert cost.dollars_per_hour == per_hour
    assert GpuHourCost.parse(str(cost)) == cost


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--gpu-hour-cost: the cost must be a number of dollars per hour, got ''."),
        ("cheap", "--gpu-hour-cost: the cost must be a number of dollars per hour, got 'cheap'."),
        ("-1", "--gpu-hour-cost: the cost must be a finite number >= 0, got '-1'."),
        (
            "prefill=2,2",
            "--gpu-hour-cost takes one number or pool=dollars pairs (prefill=2.5,decode=2.5), got 'prefill=2,2'.",
        ),
        ("prefill=2,prefill=3", "--gpu-hour-cost names the pool 'prefill' twice: 'prefill=2,prefill=3'."),
        ("decode=inf", "--gpu-hour-cost: pool 'decode' must be a finite number >= 0, got 'inf'."),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        GpuHourCost.parse(text)
    assert str(caught.value) == message


def test_cost_of_a_known_run() -> None:
    summary = summarize(RUN, DURATION_S)
    assert (summary.prompt_tokens, summary.output_tokens) == (60, 8)
    cost = TokenCost.of(GpuHourCost.parse("prefill=2.5,decode=2.5"), DURATION_S, 60, 8)
    # 5 $/h for 36 s = 0.05 $; 0.05 $ / 8 output tokens; 0.05 $ / 68 tokens.
    assert cost == TokenCost(dollars=0.05, per_million_output=6250.0, per_million_total=0.05 * 1e6 / 68)
    assert round(cost.per_million_total or 0, 6) == 735.294118


def test_cost_without_tokens_is_none_per_million() -> None:
    assert TokenCost.of(GpuHourCost.parse("3.6"), 10.0, 0, 0) == TokenCost(0.01, None, None)
    with pytest.raises(ValueError, match=r"^a run's cost needs a positive duration_s, got 0.0.$"):
        TokenCost.of(GpuHourCost.parse("3.6"), 0.0, 1, 1)


def test_summary_has_the_cost_rows() -> None:
    text = summary_markdown(info("prefill=2.5,decode=2.5"), summarize(RUN, DURATION_S))
    assert "| GPU cost (prefill=2.5,decode=2.5 $/h) | $0.050000 |\n" in text
    assert "| $ per million output tokens | 6250.0000 |\n" in text
    assert "| $ per million tokens (prompt + output) | 735.2941 |\n" in text
    assert "per million" not in summary_markdown(info(None), summarize(RUN, DURATION_S))


def test_the_cost_survives_results_json(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_results(path, info("2.5"), summarize(RUN, DURATION_S), RUN, ("default",) * 4)
    saved = load_results(path)
    assert saved.info.gpu_hour_cost == "2.5"
    assert "| $ per million output tokens | 3125.0000 |\n" in summary_markdown(saved.info, saved.summary())


def test_the_cli_refuses_a_bad_cost_before_running(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    workload = tmp_path / "w.yaml"
    workload.write_text("name: w\n")
    argv = ["run", "--base-url", "http://127.0.0.1:9", "--model", "m", "--workload", str(workload)]
    argv += ["--num-requests", "1", "--concurrency", "1", "--gpu-hour-cost", "x=", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: --gpu-hour-cost: pool 'x' must be a number of dollars per hour, got ''.\n"
    assert not (tmp_path / "o").exists()


def test_make_bench_prices_each_worker_as_one_gpu() -> None:
    """`make bench --gpu-hour-cost` is per GPU: a cluster costs each pool's price times its workers."""
    pools = GpuHourCost.parse("prefill=2,decode=3")
    assert pools.per_gpu_dollars_per_hour({"prefill": 2, "decode": 4}) == 2 * 2 + 3 * 4
    assert pools.per_gpu_dollars_per_hour({"decode": 1}) == 3
    assert GpuHourCost.parse("2.5").per_gpu_dollars_per_hour({"prefill": 1, "decode": 3}) == 10.0
    with pytest.raises(ValueError) as exc:
        GpuHourCost.parse("decode=3").per_gpu_dollars_per_hour({"prefill": 1, "decode": 1})
    assert str(exc.value) == "--gpu-hour-cost has no price for the pool(s) prefill: decode=3."


def test_dollars_per_million_tokens_at_a_steady_rate() -> None:
    # $3.6/h is $0.001/s; at 100 tokens/s a million tokens take 10,000 s: $10
    assert dollars_per_million(3.6, 100.0) == pytest.approx(10.0, rel=1e-12)
    with pytest.raises(ValueError, match="positive tokens_per_s, got 0.0"):
        dollars_per_million(3.6, 0.0)
