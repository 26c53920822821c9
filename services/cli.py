"""The `tandem` command. Flags and environment variables are read here and nowhere else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ENGINE_FLAGS = ("block_size", "num_blocks", "max_num_batched_tokens", "max_num_seqs", "max_prefill_chunk_tokens",
                "max_model_len", "attention_backend", "device", "dtype", "num_threads")


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="local HF model directory (default: tiny model)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: from --kv-cache-mib)")
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-prefill-chunk-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--num-threads", type=int, default=None)


def _engine_options(args: argparse.Namespace) -> dict[str, object]:
    options: dict[str, object] = {name: getattr(args, name) for name in ENGINE_FLAGS}
    options["kv_cache_bytes"] = args.kv_cache_mib * 1024 * 1024
    return options


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return args.model
    from services.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def cmd_generate(args: argparse.Namespace) -> int:
    from services.engine import Engine, SamplingParams
    from services.engine.tokenizer import Tokenizer

    model_dir = _model_dir(args)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    engine = Engine(model_dir, _config(args))
    if args.chat:
        prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
                   for p in args.prompts]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    for text, out in zip(args.prompts, engine.generate(prompts, params)):
        print(f"prompt: {text!r}")
        print(f"completion: {tokenizer.decode(list(out.token_ids))!r}  [{len(out.token_ids)} tokens, {out.finish_reason.value}]")
    return 0


def _config(args: argparse.Namespace):  # -> EngineConfig
    from services.engine import EngineConfig

    return EngineConfig(**_engine_options(args))  # type: ignore[arg-type]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "engine":
        from services.engine.bench import run_engine_bench

        return run_engine_bench(_model_dir(args), prompt_len=args.prompt_len, max_tokens=args.max_tokens)
    if args.target == "kv":
        from services.kvtransfer.bench import run_kv_bench

        return run_kv_bench()
    from kernels.bench import run_kernel_bench

    return run_kernel_bench()


def cmd_worker(args: argparse.Namespace) -> int:
    import functools

    from services.common.cluster_state import WorkerRole
    from services.common.worker import Worker, run
    from services.common.worker_config import WorkerConfig

    role = WorkerRole(args.command)
    config = WorkerConfig(
        role=role,
        worker_id=args.worker_id or f"{role.value}-{args.port}",
        model_dir=_model_dir(args),
        engine=_config(args),
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        metrics_port=args.metrics_port,
        redis_url=args.redis,
        cluster=args.cluster,
        heartbeat_ttl_s=args.heartbeat_ttl_s,
        lease_ttl_s=args.lease_ttl_s,
        kv_transport=args.kv_transport,
        transfer_timeout_s=args.transfer_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
    )
    if role is WorkerRole.PREFILL:
        from services.prefill.server import add_servicers
    else:
        from services.decode.server import add_servicers
    worker = Worker(config)
    return run(worker, functools.partial(add_servicers, worker))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run prompts through an in-process engine and print completions")
    _add_engine_flags(gen)
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.set_defaults(func=cmd_generate)

    for role in ("prefill", "decode"):
        w = sub.add_parser(role, help=f"run a {role} worker (gRPC)")
        _add_engine_flags(w)
        w.add_argument("--worker-id", default=None)
        w.add_argument("--host", default="127.0.0.1", help="bind address of the gRPC server")
        w.add_argument("--port", type=int, default=0, help="gRPC port (0: pick a free one)")
        w.add_argument("--advertise-host", default=None, help="address peers dial (default: --host)")
        w.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here")
        w.add_argument("--redis", default=None, help="Redis URL of the cluster state")
        w.add_argument("--cluster", default="default")
        w.add_argument("--heartbeat-ttl-s", type=float, default=5.0)
        w.add_argument("--lease-ttl-s", type=float, default=30.0)
        w.add_argument("--kv-transport", default="grpc", choices=["grpc", "torch"])
        w.add_argument("--transfer-timeout-s", type=float, default=10.0)
        w.add_argument("--drain-timeout-s", type=float, default=30.0)
        w.set_defaults(func=cmd_worker)

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured in one run")
    bench.add_argument("target", choices=["engine", "kernels", "kv"])
    bench.add_argument("--model", type=Path, default=None)
    bench.add_argument("--prompt-len", type=int, default=32)
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ValueError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code)
