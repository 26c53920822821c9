"""The `tandem` command. Flags and environment variables are read here and nowhere else.

One module per command group; each adds its subcommands to the parser:
- `generate.py`: `tandem generate` (an in-process engine);
- `serve.py`: `tandem prefill`, `tandem decode` (workers) and `tandem gateway`;
- `cluster.py`: `tandem up`, `tandem status`, `tandem drain`;
- `autoscaler.py`: `tandem autoscaler`;
- `bench.py`: `tandem bench`;
- `simulate.py`: `tandem simulate` and `tandem plan`.

The flags of the services are generated from their frozen configs (`tandem.common.options`).
`main()` only adds the flags of the command it runs, so that `tandem drain` (a Kubernetes
preStop hook) or `tandem gateway` does not load the engine's config (and torch) to parse its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from tandem.cli import autoscaler, bench, cluster, generate, serve, simulate

# command -> (help, the function that adds its flags and sets `func`)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "generate": ("run prompts through an in-process engine and print completions", generate.add_generate_flags),
    "prefill": ("run a prefill worker (gRPC)", serve.add_worker_flags),
    "decode": ("run a decode worker (gRPC)", serve.add_worker_flags),
    "gateway": ("run the OpenAI-compatible gateway (HTTP)", serve.add_gateway_flags),
    "up": ("start a whole local cluster (Redis, workers, gateway) and wait", cluster.add_up_flags),
    "status": ("live workers and pool load of a cluster, from Redis", cluster.add_status_flags),
    "autoscaler": (
        "scale the prefill and decode pools on their queues (runs until SIGTERM)",
        autoscaler.add_autoscaler_flags,
    ),
    "drain": ("drain a worker before it stops (scale-down, Kubernetes preStop)", cluster.add_drain_flags),
    "bench": ("benchmarks that print ratios measured in one run; serve: load test", bench.add_bench_flags),
    "simulate": ("simulate a cluster on a trace or workload with the real policies", simulate.add_simulate_flags),
    "plan": ("search the cheapest prefill/decode sizing that meets the SLOs, by simulation", simulate.add_plan_flags),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole `tandem` parser; with `only`, the other commands are listed without flags."""
    parser = argparse.ArgumentParser(prog="tandem", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_flags) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if only is None or only == name:
            add_flags(command)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "serve"]:  # forwarded whole: the load generator reads its own flags
        from tandem.loadtest.__main__ import main as loadtest_main

        raise SystemExit(loadtest_main(["run", *argv[2:]]))
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    try:
        code = args.func(args)
    except ValueError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code)
