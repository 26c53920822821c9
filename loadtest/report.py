"""Reports of a run: `results.json` (every request's timings, for re-analysis) and `summary.md`.

results.json layout (version 1):
    {"version": 1, "run": RunInfo fields, "duration_s": float,
     "summary": Summary.to_dict(), "requests": [RequestRecord.to_dict() + {"class_name"}]}
`load_results` reads it back; `summarize(records, duration_s, slo)` then recomputes the summary,
possibly against another SLO.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.metrics import LatencyStats, Summary
from loadtest.record import RequestRecord

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


@dataclass(frozen=True)
class SavedRun:
    """A run read back from results.json."""

    info: RunInfo
    duration_s: float
    records: tuple[RequestRecord, ...]
    class_names: tuple[str, ...]


def write_results(path: Path, info: RunInfo, summary: Summary, records: Sequence[RequestRecord],
                  class_names: Sequence[str]) -> None:
    """Write results.json; `class_names[i]` is the workload class of `records[i]`."""
    requests = [{**record.to_dict(), "class_name": name} for record, name in zip(records, class_names, strict=True)]
    data = {"version": RESULTS_VERSION, "run": asdict(info), "duration_s": summary.duration_s,
            "summary": summary.to_dict(), "requests": requests}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_results(path: Path) -> SavedRun:
    """Read a results.json written by `write_results`."""
    data: Mapping[str, Any] = json.loads(Path(path).read_text())
    if data.get("version") != RESULTS_VERSION:
        raise ValueError(f"{path}: unsupported results version {data.get('version')!r} "
                         f"(this loadtest reads version {RESULTS_VERSION}).")
    requests = data["requests"]
    return SavedRun(info=RunInfo(**data["run"]), duration_s=float(data["duration_s"]),
                    records=tuple(RequestRecord.from_dict(r) for r in requests),
                    class_names=tuple(str(r.get("class_name", "default")) for r in requests))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _latency_row(name: str, stats: LatencyStats) -> str:
    cells = [str(stats.count)] + [_ms(v) for v in (stats.mean_ms, stats.p50_ms, stats.p90_ms, stats.p99_ms)]
    return f"| {name} | " + " | ".join(cells) + " |"


def summary_markdown(info: RunInfo, summary: Summary) -> str:
    """The human-readable report of one run."""
    lines = [
        "# Load test summary", "",
        f"- target: `{info.base_url}` model `{info.model}` endpoint `{info.endpoint}`",
        f"- workload: `{info.workload}`, {info.num_requests} requests, seed {info.seed}",
        f"- load: {info.load}", f"- duration: {summary.duration_s:.3f} s", "",
        "| metric | value |", "|---|---|",
        f"| requests completed | {summary.num_completed} / {summary.num_requests} |",
        f"| errors | {summary.num_errors} |",
        f"| request throughput (req/s) | {summary.request_throughput_rps:.3f} |",
        f"| output token throughput (tok/s) | {summary.output_throughput_tps:.2f} |",
        f"| prompt token throughput (tok/s) | {summary.prompt_throughput_tps:.2f} |",
    ]
    if summary.slo is not None:
        lines += [f"| goodput (SLO {summary.slo}) | {summary.num_good} requests, "
                  f"{summary.goodput_fraction:.1%}, {summary.goodput_rps:.3f} req/s |"]
    lines += ["", "| latency (ms) | count | mean | p50 | p90 | p99 |", "|---|---|---|---|---|---|",
              _latency_row("TTFT", summary.ttft), _latency_row("TPOT", summary.tpot),
              _latency_row("ITL", summary.itl), _latency_row("E2E", summary.e2e)]
    if summary.errors_by_kind:
        lines += ["", "| error kind | count |", "|---|---|"]
        lines += [f"| {kind.value} | {count} |" for kind, count in summary.errors_by_kind]
    lines += ["", "Percentiles: linear interpolation (numpy's default). Latencies of successful requests only.", ""]
    return "\n".join(lines)
