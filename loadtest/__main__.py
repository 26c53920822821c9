"""`python -m loadtest`: the command line. Flags are read here and nowhere else.

    python -m loadtest run --base-url http://127.0.0.1:8000 --model tiny-llama-v1 \
        --workload loadtest/workloads/random.yaml --num-requests 100 \
        (--rate 4 --arrival poisson|constant|bursty | --concurrency 8) \
        --seed 0 --slo ttft=200,tpot=50 --out runs/first
    python -m loadtest summarize runs/first/results.json [--slo ttft=100]

`run` writes OUT/results.json and OUT/summary.md and prints the summary. `summarize` re-analyses
a saved run (e.g. against another SLO) and prints its summary.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest.arrivals import ArrivalPattern, ClosedLoop, LoadShape, OpenLoop
from loadtest.client import ClientConfig, Endpoint, StreamingClient
from loadtest.metrics import summarize
from loadtest.report import RunInfo, load_results, summary_markdown, write_results
from loadtest.runner import ProgressBar, RunClock, run_load
from loadtest.slo import SLO
from loadtest.workloads import load_workload


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description="OpenAI-compatible load generator.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a workload against a server")
    run.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    run.add_argument("--model", required=True)
    run.add_argument("--workload", required=True, type=Path, help="a workload YAML file")
    run.add_argument("--num-requests", required=True, type=int)
    load = run.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: mean requests per second")
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    run.add_argument("--arrival", choices=[p.value for p in ArrivalPattern], default="poisson")
    run.add_argument("--burst-size", type=int, default=8, help="requests per burst (--arrival bursty)")
    run.add_argument("--endpoint", choices=[e.name.lower() for e in Endpoint], default="completions")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--slo", default=None, help="e.g. ttft=200,tpot=50 (milliseconds)")
    run.add_argument("--timeout-s", type=float, default=300.0, help="bound on each request")
    run.add_argument("--api-key", default=None)
    run.add_argument("--out", required=True, type=Path, help="output directory")
    run.add_argument("--no-progress", action="store_true")
    again = commands.add_parser("summarize", help="re-analyse a saved results.json")
    again.add_argument("results", type=Path)
    again.add_argument("--slo", default=None, help="default: the run's own SLO")
    run.set_defaults(handler=_run)
    again.set_defaults(handler=_summarize)
    return parser


def _shape(args: argparse.Namespace) -> LoadShape:
    if args.concurrency is not None:
        return ClosedLoop(args.concurrency)
    return OpenLoop(args.rate, ArrivalPattern(args.arrival), burst_size=args.burst_size)


def _run(args: argparse.Namespace) -> int:
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}.")
    shape = _shape(args)
    slo = None if args.slo is None else SLO.parse(args.slo)
    config = ClientConfig(args.base_url, args.model, endpoint=Endpoint[args.endpoint.upper()],
                          timeout_s=args.timeout_s, api_key=args.api_key)
    requests = load_workload(args.workload).generate(args.num_requests, args.seed)
    clock = RunClock()
    progress = ProgressBar(len(requests), enabled=not args.no_progress)

    async def main() -> tuple:
        async with StreamingClient(config, clock=clock) as client:
            return await run_load(client, requests, shape, args.seed, clock, on_done=progress.update)
    try:
        result = asyncio.run(main())
    finally:
        progress.close()
    summary = summarize(result.records, result.duration_s, slo)
    info = RunInfo(base_url=config.base_url, model=config.model, endpoint=config.endpoint.value,
                   workload=str(args.workload), num_requests=len(requests), seed=args.seed,
                   load=shape.describe(), slo=None if slo is None else str(slo))
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out / "results.json", info, summary, result.records, [r.class_name for r in requests])
    markdown = summary_markdown(info, summary)
    (args.out / "summary.md").write_text(markdown)
    print(markdown)
    return 0


def _summarize(args: argparse.Namespace) -> int:
    saved = load_results(args.results)
    slo_text = args.slo if args.slo is not None else saved.info.slo
    slo = None if slo_text is None else SLO.parse(slo_text)
    print(summary_markdown(saved.info, summarize(saved.records, saved.duration_s, slo)))
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
