"""`python -m tandem.loadtest`: the command line. Flags are read here and nowhere else.

    python -m tandem.loadtest run --base-url http://127.0.0.1:8000 --model tiny-llama-v1 \
        --workload loadtest/tandem/loadtest/workloads/random.yaml --num-requests 100 \
        (--rate 4 --arrival poisson|constant|bursty | --concurrency 8 | --concurrency 1,4,16) \
        --seed 0 --slo ttft=200,tpot=50 --out runs/first
    python -m tandem.loadtest summarize runs/first/results.json [--slo ttft=100]
    python -m tandem.loadtest compare runs/a/results.json runs/b/results.json [--slo ...] [--labels a,b] [--out DIR]

`run` writes OUT/results.json, OUT/summary.md, OUT/latency_cdf.png and OUT/throughput.png and
prints the summary. With a list of concurrencies (a sweep) it runs each level in turn, same
workload and seed, into OUT/c<level>/ (results.json, summary.md), then writes the two plots and
a summary.md comparing the levels into OUT. `summarize` re-analyses a saved run (e.g. against
another SLO); `compare` puts saved runs side by side (and with --out writes compare.md and the
plots). `tandem bench serve ...` is `run` under another name.

    python -m tandem.loadtest bench [--out BENCHMARKS.md] [--only engine,kv,...] [--quick]

`bench` is `make bench`: the project's benchmark set (loadtest/tandem/loadtest/suite/), written to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from tandem.loadtest.arrivals import ArrivalPattern, ClosedLoop, LoadShape, OpenLoop
from tandem.loadtest.client import ClientConfig, Endpoint, StreamingClient
from tandem.loadtest.cost import GpuHourCost
from tandem.loadtest.metrics import summarize
from tandem.loadtest.plots import write_plots
from tandem.loadtest.report import RunInfo, SavedRun, compare_markdown, load_results, summary_markdown, write_results
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.runner import ProgressBar, RunClock, RunResult, run_load
from tandem.loadtest.slo import SLO
from tandem.loadtest.workloads import load_workload


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tandem.loadtest", description="OpenAI-compatible load generator.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a workload against a server")
    run.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    run.add_argument("--model", required=True)
    run.add_argument("--workload", required=True, type=Path, help="a workload YAML file")
    run.add_argument("--num-requests", required=True, type=int)
    load = run.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: mean requests per second")
    load.add_argument("--concurrency", help="closed loop: requests in flight; a list (1,4,16) runs a sweep")
    run.add_argument("--arrival", choices=[p.value for p in ArrivalPattern], default="poisson")
    run.add_argument("--burst-size", type=int, default=8, help="requests per burst (--arrival bursty)")
    run.add_argument("--endpoint", choices=[e.name.lower() for e in Endpoint], default="completions")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--slo", default=None, help="e.g. ttft=200,tpot=50 (milliseconds)")
    run.add_argument("--timeout-s", type=float, default=300.0, help="bound on each request")
    run.add_argument("--api-key", default=None)
    run.add_argument(
        "--gpu-hour-cost",
        default=None,
        help="dollars per hour: one number for the cluster, or per pool (prefill=2.5,decode=2.5); "
        "adds $ per million output tokens and per million tokens to the report",
    )
    run.add_argument("--out", required=True, type=Path, help="output directory")
    run.add_argument("--no-progress", action="store_true")
    again = commands.add_parser("summarize", help="re-analyse a saved results.json")
    again.add_argument("results", type=Path)
    again.add_argument("--slo", default=None, help="default: the run's own SLO")
    side = commands.add_parser("compare", help="put saved runs side by side")
    side.add_argument("results", type=Path, nargs="+", help="results.json files")
    side.add_argument("--slo", default=None, help="default: each run's own SLO")
    side.add_argument(
        "--labels",
        default=None,
        help="column names, comma-separated (default: each run's load, or the file paths if those repeat)",
    )
    side.add_argument("--out", type=Path, default=None, help="also write OUT/compare.md and the two PNG plots")
    suite = commands.add_parser("bench", help="the project's benchmark set (make bench)")
    suite.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    suite.add_argument("--only", default=None, help="comma list of sections (default: all)")
    suite.add_argument("--quick", action="store_true", help="tiny sizes, to test the suite itself")
    suite.add_argument(
        "--gpu-hour-cost",
        default="prefill=2.5,decode=2.5",
        help="dollars per GPU-hour of each worker, by pool (prefill=2.5,decode=2.5) or one number: the cost figures",
    )
    run.set_defaults(handler=_run)
    again.set_defaults(handler=_summarize)
    side.set_defaults(handler=_compare)
    suite.set_defaults(handler=_bench)
    return parser


def _bench(args: argparse.Namespace) -> int:
    from tandem.loadtest.suite.run import parse_only, run_suite  # imports torch: only for this command

    only = parse_only(args.only)
    cost = GpuHourCost.parse(args.gpu_hour_cost)
    return run_suite(
        args.out, only, args.quick, lambda line: print(line, file=sys.stderr, flush=True), gpu_hour_cost=cost
    )


def concurrency_levels(text: str) -> tuple[int, ...]:
    """Parse `--concurrency`: `8` -> (8,), `1,4,16` -> (1, 4, 16); positive, distinct, in order."""
    try:
        levels = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ValueError(
            f"--concurrency must be a positive integer or a comma-separated list of them (e.g. 1,4,16), got {text!r}."
        ) from None
    if any(level < 1 for level in levels):
        raise ValueError(f"--concurrency levels must be >= 1, got {text!r}.")
    if len(set(levels)) != len(levels):
        raise ValueError(f"--concurrency lists a level twice: {text!r}.")
    return levels


def _shapes(args: argparse.Namespace) -> list[LoadShape]:
    if args.concurrency is not None:
        return [ClosedLoop(level) for level in concurrency_levels(args.concurrency)]
    return [OpenLoop(args.rate, ArrivalPattern(args.arrival), burst_size=args.burst_size)]


def _run(args: argparse.Namespace) -> int:
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}.")
    shapes = _shapes(args)  # every level is validated before the first is run
    slo = None if args.slo is None else SLO.parse(args.slo)
    cost = None if args.gpu_hour_cost is None else GpuHourCost.parse(args.gpu_hour_cost)  # before any run
    config = ClientConfig(
        args.base_url,
        args.model,
        endpoint=Endpoint[args.endpoint.upper()],
        timeout_s=args.timeout_s,
        api_key=args.api_key,
    )
    requests = load_workload(args.workload).generate(args.num_requests, args.seed)
    sweep = len(shapes) > 1
    runs = [
        _run_one(
            args,
            config,
            requests,
            shape,
            slo,
            cost,
            args.out / f"c{shape.concurrency}" if sweep and isinstance(shape, ClosedLoop) else args.out,
        )
        for shape in shapes
    ]
    labels = [run.info.load for run in runs]
    write_plots(args.out, runs, labels)
    if sweep:
        markdown = compare_markdown("Concurrency sweep", runs, labels, slo)
        (args.out / "summary.md").write_text(markdown)
        print(markdown)
    return 0


def _run_one(
    args: argparse.Namespace,
    config: ClientConfig,
    requests: Sequence[WorkloadRequest],
    shape: LoadShape,
    slo: SLO | None,
    cost: GpuHourCost | None,
    out: Path,
) -> SavedRun:
    """Run `requests` under `shape`; write OUT/results.json and OUT/summary.md; print the summary."""
    clock = RunClock()
    progress = ProgressBar(len(requests), enabled=not args.no_progress)

    async def main() -> RunResult:
        async with StreamingClient(config, clock=clock) as client:
            return await run_load(client, requests, shape, args.seed, clock, on_done=progress.update)

    try:
        result = asyncio.run(main())
    finally:
        progress.close()
    summary = summarize(result.records, result.duration_s, slo)
    info = RunInfo(
        base_url=config.base_url,
        model=config.model,
        endpoint=config.endpoint.value,
        workload=str(args.workload),
        num_requests=len(requests),
        seed=args.seed,
        load=shape.describe(),
        slo=None if slo is None else str(slo),
        concurrency=shape.concurrency if isinstance(shape, ClosedLoop) else None,
        gpu_hour_cost=None if cost is None else str(cost),
    )
    out.mkdir(parents=True, exist_ok=True)
    class_names = tuple(r.class_name for r in requests)
    write_results(out / "results.json", info, summary, result.records, class_names)
    markdown = summary_markdown(info, summary)
    (out / "summary.md").write_text(markdown)
    print(markdown)
    return SavedRun(info=info, duration_s=result.duration_s, records=result.records, class_names=class_names)


def _summarize(args: argparse.Namespace) -> int:
    saved = load_results(args.results)
    print(summary_markdown(saved.info, saved.summary(None if args.slo is None else SLO.parse(args.slo))))
    return 0


def _compare(args: argparse.Namespace) -> int:
    runs = [load_results(path) for path in args.results]
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
    else:
        labels = [run.info.load for run in runs]
        if len(set(labels)) != len(labels):
            labels = [str(path) for path in args.results]
    slo = None if args.slo is None else SLO.parse(args.slo)
    markdown = compare_markdown("Load test comparison", runs, labels, slo)
    print(markdown)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.md").write_text(markdown)
        write_plots(args.out, runs, labels)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a bad argument or file)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
