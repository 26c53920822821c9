"""Reports of a run: `results.json` (every request's timings, for re-analysis), `summary.md`, and
the side-by-side table of several runs (`compare_markdown`: a sweep's summary.md, compare.md).

results.json layout (version 1):
    {"version": 1, "run": RunInfo fields, "duration_s": float,
     "summary": Summary.to_dict(), "requests": [RequestRecord.to_dict() + {"class_name"}]}
`load_results` reads it back; `summarize(records, duration_s, slo)` then recomputes the summary,
possibly against another SLO. `run.concurrency` is the closed-loop concurrency (None for an
open-loop run; files written before it existed read back as None). `run.gpu_hour_cost` is the
run's `--gpu-hour-cost` (None: none given; the summary then has no cost rows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tandem.loadtest.cost import GpuHourCost, TokenCost
from tandem.loadtest.metrics import LatencyStats, Summary, mean_in_flight, summarize
from tandem.loadtest.record import RequestRecord
from tandem.loadtest.slo import SLO

RESULTS_VERSION = 1


@dataclass(frozen=True)
class RunInfo:
    """What was run: target, workload, load shape and objectives (strings, for reports)."""

    base_url: str
    model: str
    endpoint: str
    workload: str
    num_requests: int
    seed: int
    load: str
    slo: str | None
    concurrency: int | None = None
    # `--gpu-hour-cost` as given (cost.py); None: no cost rows.
    gpu_hour_cost: str | None = None


@dataclass(frozen=True)
class SavedRun:
    """A run read back from results.json (or just made, by the CLI)."""

    info: RunInfo
    duration_s: float
    records: tuple[RequestRecord, ...]
    class_names: tuple[str, ...]

    @property
    def concurrency(self) -> float:
        """Requests in flight: the closed-loop concurrency, else the mean reached (`mean_in_flight`)."""
        if self.info.concurrency is not None:
            return float(self.info.concurrency)
        return mean_in_flight(self.records, self.duration_s)

    def summary(self, slo: SLO | None = None) -> Summary:
        """The run's summary against `slo`, by default the SLO it was run with."""
        if slo is None and self.info.slo is not None:
            slo = SLO.parse(self.info.slo)
        return summarize(self.records, self.duration_s, slo)


def write_results(
    path: Path, info: RunInfo, summary: Summary, records: Sequence[RequestRecord], class_names: Sequence[str]
) -> None:
    """Write results.json; `class_names[i]` is the workload class of `records[i]`."""
    requests = [{**record.to_dict(), "class_name": name} for record, name in zip(records, class_names, strict=True)]
    data = {
        "version": RESULTS_VERSION,
        "run": asdict(info),
        "duration_s": summary.duration_s,
        "summary": summary.to_dict(),
        "requests": requests,
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_results(path: Path) -> SavedRun:
    """Read a results.json written by `write_results`; ValueError if it is missing or malformed."""
    try:
        data: Mapping[str, Any] = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}.") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not JSON ({err}); expected a results.json written by `python -m tandem.loadtest run`."
        ) from None
    if not isinstance(data, Mapping) or data.get("version") != RESULTS_VERSION:
        version = data.get("version") if isinstance(data, Mapping) else None
        raise ValueError(
            f"{path}: unsupported results version {version!r} (this loadtest reads version {RESULTS_VERSION})."
        )
    try:
        requests = data["requests"]
        return SavedRun(
            info=RunInfo(**data["run"]),
            duration_s=float(data["duration_s"]),
            records=tuple(RequestRecord.from_dict(r) for r in requests),
            class_names=tuple(str(r.get("class_name", "default")) for r in requests),
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: malformed results.json ({type(err).__name__}: {err}).") from None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _dollars(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _latency_row(name: str, stats: LatencyStats) -> str:
    cells = [str(stats.count)] + [_ms(v) for v in (stats.mean_ms, stats.p50_ms, stats.p90_ms, stats.p99_ms)]
    return f"| {name} | " + " | ".join(cells) + " |"


def summary_markdown(info: RunInfo, summary: Summary) -> str:
    """The human-readable report of one run."""
    lines = [
        "# Load test summary",
        "",
        f"- target: `{info.base_url}` model `{info.model}` endpoint `{info.endpoint}`",
        f"- workload: `{info.workload}`, {info.num_requests} requests, seed {info.seed}",
        f"- load: {info.load}",
        f"- duration: {summary.duration_s:.3f} s",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests completed | {summary.num_completed} / {summary.num_requests} |",
        f"| errors | {summary.num_errors} |",
        f"| request throughput (req/s) | {summary.request_throughput_rps:.3f} |",
        f"| output token throughput (tok/s) | {summary.output_throughput_tps:.2f} |",
        f"| prompt token throughput (tok/s) | {summary.prompt_throughput_tps:.2f} |",
    ]
    if info.gpu_hour_cost is not None:
        cost = TokenCost.of(
            GpuHourCost.parse(info.gpu_hour_cost), summary.duration_s, summary.prompt_tokens, summary.output_tokens
        )
        lines += [
            f"| GPU cost ({info.gpu_hour_cost} $/h) | ${cost.dollars:.6f} |",
            f"| $ per million output tokens | {_dollars(cost.per_million_output)} |",
            f"| $ per million tokens (prompt + output) | {_dollars(cost.per_million_total)} |",
        ]
    if summary.slo is not None:
        lines += [
            f"| goodput (SLO {summary.slo}) | {summary.num_good} requests, "
            f"{summary.goodput_fraction:.1%}, {summary.goodput_rps:.3f} req/s |"
        ]
    lines += [
        "",
        "| latency (ms) | count | mean | p50 | p90 | p99 |",
        "|---|---|---|---|---|---|",
        _latency_row("TTFT", summary.ttft),
        _latency_row("TPOT", summary.tpot),
        _latency_row("ITL", summary.itl),
        _latency_row("E2E", summary.e2e),
    ]
    if summary.errors_by_kind:
        lines += ["", "| error kind | count |", "|---|---|"]
        lines += [f"| {kind.value} | {count} |" for kind, count in summary.errors_by_kind]
    lines += ["", "Percentiles: linear interpolation (numpy's default). Latencies of successful requests only.", ""]
    return "\n".join(lines)


def compare_markdown(title: str, runs: Sequence[SavedRun], labels: Sequence[str], slo: SLO | None = None) -> str:
    """Runs side by side, one column each, headed by `labels`; `slo` overrides each run's own.

    The goodput rows appear when at least one run has an SLO ("-" for the others).
    """
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs.")
    summaries = [run.summary(slo) for run in runs]

    def row(name: str, cells: Sequence[str]) -> str:
        return f"| {name} | " + " | ".join(cells) + " |"

    def latency_row(name: str, metric: str, field: str) -> str:
        return row(name, [_ms(getattr(getattr(s, metric), field)) for s in summaries])

    lines = [
        f"# {title}",
        "",
        row("metric", labels),
        "|---" * (len(runs) + 1) + "|",
        row("load", [run.info.load for run in runs]),
        row("requests in flight", [f"{run.concurrency:.2f}" for run in runs]),
        row("requests ok / errors", [f"{s.num_completed} / {s.num_errors}" for s in summaries]),
        row("request throughput (req/s)", [f"{s.request_throughput_rps:.3f}" for s in summaries]),
        row("output token throughput (tok/s)", [f"{s.output_throughput_tps:.2f}" for s in summaries]),
        latency_row("TTFT p50 (ms)", "ttft", "p50_ms"),
        latency_row("TTFT p90 (ms)", "ttft", "p90_ms"),
        latency_row("TTFT p99 (ms)", "ttft", "p99_ms"),
        latency_row("TPOT p50 (ms)", "tpot", "p50_ms"),
        latency_row("TPOT p99 (ms)", "tpot", "p99_ms"),
        latency_row("ITL p99 (ms)", "itl", "p99_ms"),
        latency_row("E2E p99 (ms)", "e2e", "p99_ms"),
    ]
    if any(s.slo is not None for s in summaries):
        lines += [
            row("SLO", ["-" if s.slo is None else str(s.slo) for s in summaries]),
            row("goodput (req/s)", ["-" if s.goodput_rps is None else f"{s.goodput_rps:.3f}" for s in summaries]),
            row(
                "goodput (% of requests)",
                ["-" if s.goodput_fraction is None else f"{s.goodput_fraction:.1%}" for s in summaries],
            ),
        ]
    lines += [
        "",
        "Requests in flight: the closed-loop concurrency, or for an open-loop run the mean reached "
        "(sum of E2E / duration). Latencies of successful requests only.",
        "",
    ]
    return "\n".join(lines)
