"""PNG plots of one or more runs: latency CDFs and throughput against concurrency.

- `latency_cdf.png`: empirical CDFs of TTFT, TPOT, ITL (every gap) and E2E in milliseconds,
  one panel each, one curve per run; successful requests only (as in the summaries).
- `throughput.png`: output-token throughput (tok/s) and request throughput (req/s) against
  requests in flight (`SavedRun.concurrency`: the closed-loop concurrency, or the mean an
  open-loop run reached), one point per run.

Figures are drawn with `matplotlib.figure.Figure` and the Agg canvas directly, never pyplot:
no global figure registry, no GUI backend, safe in any thread. Sizes are exact pixels (no
tight bounding box), so a file is `size_px` wide and high.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tandem.loadtest.record import RequestRecord
from tandem.loadtest.report import SavedRun

DPI = 100
LATENCY_CDF_SIZE_PX = (1200, 900)
THROUGHPUT_SIZE_PX = (1200, 500)
LATENCY_CDF_FILE = "latency_cdf.png"
THROUGHPUT_FILE = "throughput.png"


def ecdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF as step points: sorted values and the fraction <= each, (i + 1) / n."""
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def latencies_ms(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """TTFT, TPOT, ITL gaps and E2E of the successful records, in milliseconds, by panel title."""
    done = [record for record in records if record.ok]
    return {
        "TTFT": [r.ttft_s * 1000.0 for r in done if r.ttft_s is not None],
        "TPOT": [r.tpot_s * 1000.0 for r in done if r.tpot_s is not None],
        "ITL": [gap * 1000.0 for r in done for gap in r.itl_gaps_s],
        "E2E": [r.e2e_s * 1000.0 for r in done],
    }


def _figure(size_px: tuple[int, int]) -> Figure:
    figure = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _check(runs: Sequence[SavedRun], labels: Sequence[str]) -> None:
    if not runs:
        raise ValueError("Plots need at least one run.")
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs.")


def write_latency_cdf(path: Path, runs: Sequence[SavedRun], labels: Sequence[str]) -> Path:
    """Draw the four latency CDFs of `runs` (curves named by `labels`) into the PNG `path`."""
    _check(runs, labels)
    figure = _figure(LATENCY_CDF_SIZE_PX)
    axes: Sequence[Axes] = figure.subplots(2, 2).flatten()
    per_run = [latencies_ms(run.records) for run in runs]
    for ax, metric in zip(axes, ("TTFT", "TPOT", "ITL", "E2E")):
        drawn = False
        for values, label in zip(per_run, labels):
            if values[metric]:
                xs, ys = ecdf(values[metric])
                ax.step(xs, ys, where="post", label=label)
                drawn = True
        ax.set_title(metric if metric != "ITL" else "ITL (every gap)")
        ax.set_xlabel("milliseconds")
        ax.set_ylabel("fraction of requests" if metric != "ITL" else "fraction of gaps")
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small", loc="lower right")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    figure.suptitle("Latency CDFs (successful requests)")
    return _save(figure, Path(path))


def write_throughput(path: Path, runs: Sequence[SavedRun], labels: Sequence[str]) -> Path:
    """Draw output-token and request throughput against requests in flight into the PNG `path`."""
    _check(runs, labels)
    figure = _figure(THROUGHPUT_SIZE_PX)
    token_ax, request_ax = figure.subplots(1, 2)
    points = sorted(
        ((run.concurrency, run.summary(), label) for run, label in zip(runs, labels)), key=lambda point: point[0]
    )
    xs = [x for x, _, _ in points]
    for ax, ys, unit in (
        (token_ax, [s.output_throughput_tps for _, s, _ in points], "output tokens/s"),
        (request_ax, [s.request_throughput_rps for _, s, _ in points], "requests/s"),
    ):
        ax.plot(xs, ys, marker="o")
        for x, y, (_, _, label) in zip(xs, ys, points):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        ax.set_xlabel("requests in flight")
        ax.set_ylabel(unit)
        ax.set_title(f"{unit} vs concurrency")
        ax.set_ylim(bottom=0.0)
        ax.margins(x=0.15)  # room for the last point's label
        ax.grid(True, alpha=0.3)
    figure.suptitle("Throughput (successful requests)")
    return _save(figure, Path(path))


def write_plots(out_dir: Path, runs: Sequence[SavedRun], labels: Sequence[str]) -> tuple[Path, Path]:
    """Write OUT_DIR/latency_cdf.png and OUT_DIR/throughput.png; returns their paths."""
    out_dir = Path(out_dir)
    return (
        write_latency_cdf(out_dir / LATENCY_CDF_FILE, runs, labels),
        write_throughput(out_dir / THROUGHPUT_FILE, runs, labels),
    )
