"""`tandem bench`: benchmarks that print ratios measured in one run. `tandem bench serve FLAGS`
is the load generator (`python -m tandem.loadtest run FLAGS`); `main()` forwards it whole."""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem.cli.inputs import model_dir


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        choices=["engine", "kernels", "kv", "gateway", "guardrails", "serve"],
        help="serve FLAGS: the load generator, `python -m tandem.loadtest run FLAGS` (main() forwards it)",
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "serve":  # main() forwards `bench serve ...`; only `bench --flag serve` gets here
        raise ValueError("put the load generator's flags after `serve`: tandem bench serve --base-url URL ...")
    if args.target == "engine":
        from tandem.loadtest.bench.engine import run_engine_bench

        return run_engine_bench(model_dir(args.model), prompt_len=args.prompt_len, max_tokens=args.max_tokens)
    if args.target == "gateway":
        from tandem.loadtest.bench.gateway import run_gateway_bench

        return run_gateway_bench(model_dir(args.model))
    if args.target == "guardrails":
        from tandem.loadtest.bench.guardrails import run_guardrails_bench

        run_guardrails_bench(model_dir(args.model))
        return 0
    if args.target == "kv":
        from tandem.loadtest.bench.kv import run_kv_bench

        return run_kv_bench()
    from tandem.loadtest.bench.kernels import run_kernel_bench

    return run_kernel_bench()
