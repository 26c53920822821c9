"""The `tandem` command. Flags and environment variables are read here and nowhere else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem.common.tracing import TracingConfig
    from tandem.launcher.config import LocalClusterConfig
    from tandem.launcher.ray_cluster import RayCluster

RAY_OWN_HEAD = "local"  # `tandem up --ray` without an address: start a private Ray head
ENGINE_FLAGS = (
    "block_size",
    "num_blocks",
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_prefill_chunk_tokens",
    "max_model_len",
    "attention_backend",
    "device",
    "dtype",
    "num_threads",
)


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
    from tandem.engine.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def cmd_generate(args: argparse.Namespace) -> int:
    from tandem.engine import Engine, SamplingParams
    from tandem.engine.tokenizer import Tokenizer

    model_dir = _model_dir(args)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    engine = Engine(model_dir, _config(args))
    if args.chat:
        prompts = [
            tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in args.prompts
        ]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompts]
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    for text, out in zip(args.prompts, engine.generate(prompts, params)):
        print(f"prompt: {text!r}")
        completion = tokenizer.decode(list(out.token_ids))
        print(f"completion: {completion!r}  [{len(out.token_ids)} tokens, {out.finish_reason.value}]")
    return 0


def _config(args: argparse.Namespace):  # -> EngineConfig
    from tandem.engine import EngineConfig

    return EngineConfig(**_engine_options(args))  # type: ignore[arg-type]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "serve":  # main() forwards `bench serve ...`; only `bench --flag serve` gets here
        raise ValueError("put the load generator's flags after `serve`: tandem bench serve --base-url URL ...")
    if args.target == "engine":
        from tandem.engine.bench import run_engine_bench

        return run_engine_bench(_model_dir(args), prompt_len=args.prompt_len, max_tokens=args.max_tokens)
    if args.target == "gateway":
        from tandem.gateway.bench import run_gateway_bench

        return run_gateway_bench(_model_dir(args))
    if args.target == "kv":
        from tandem.kvtransfer.bench import run_kv_bench

        return run_kv_bench()
    from tandem.kernels.bench import run_kernel_bench

    return run_kernel_bench()


def _add_tracing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--otel-exporter",
        default="none",
        choices=["none", "otlp", "file"],
        help="where OpenTelemetry spans go (default: none, no overhead)",
    )
    parser.add_argument(
        "--otel-endpoint",
        default=None,
        help="OTLP/gRPC collector for --otel-exporter otlp, e.g. http://localhost:4317 (http: plaintext, https: TLS)",
    )
    parser.add_argument(
        "--otel-file",
        type=Path,
        default=None,
        help="for --otel-exporter file: append one JSON line per span here (shareable by processes)",
    )


def _tracing_config(args: argparse.Namespace) -> TracingConfig:
    from tandem.common.tracing import TracingConfig

    return TracingConfig(exporter=args.otel_exporter, otlp_endpoint=args.otel_endpoint, file_path=args.otel_file)


def cmd_worker(args: argparse.Namespace) -> int:
    import functools

    from tandem.common.workers import WorkerRole
    from tandem.worker.config import WorkerConfig
    from tandem.worker.worker import Worker, run

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
        tracing=_tracing_config(args),
    )
    if role is WorkerRole.PREFILL:
        from tandem.prefill.server import add_servicers
    else:
        from tandem.decode.server import add_servicers
    worker = Worker(config)
    return run(worker, functools.partial(add_servicers, worker))


def cmd_gateway(args: argparse.Namespace) -> int:
    import os

    from tandem.gateway.config import GatewayConfig
    from tandem.gateway.limits import RateLimitConfig
    from tandem.gateway.server import run
    from tandem.scheduler import SchedulerConfig

    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("TANDEM_API_KEYS", "").split(",") if k.strip()]
    config = GatewayConfig(
        model_dir=_model_dir(args),
        redis_url=args.redis,
        served_model_name=args.served_model_name,
        model_id=args.model_id,
        max_model_len=args.max_model_len,
        host=args.host,
        port=args.port,
        cluster=args.cluster,
        api_keys=frozenset(keys),
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
        prefill_timeout_s=args.prefill_timeout_s,
        decode_idle_timeout_s=args.decode_idle_timeout_s,
        scheduler=SchedulerConfig(
            policy=args.policy, block_size=args.block_size, local_prefill_max_tokens=args.local_prefill_max_tokens
        ),
        rate_limits=RateLimitConfig(requests_per_minute=args.rate_limit_rpm, tokens_per_minute=args.rate_limit_tpm),
        tracing=_tracing_config(args),
    )
    return run(config)


def _up_state_file() -> Path:
    """Where `tandem up` records its cluster for `tandem status`: $TANDEM_CACHE_DIR/up.json."""
    from tandem.engine.tiny_model import default_cache_dir
    from tandem.launcher.state_file import STATE_FILE_NAME

    return default_cache_dir() / STATE_FILE_NAME


def cmd_up(args: argparse.Namespace) -> int:
    import logging
    import os

    from tandem.launcher import LocalClusterConfig, TracingFlags
    from tandem.launcher.up import run_up

    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("TANDEM_API_KEYS", "").split(",") if k.strip()]
    config = LocalClusterConfig(
        num_prefill=args.prefill,
        num_decode=args.decode,
        host=args.host,
        port=args.port,
        model_dir=args.model,
        redis_url=args.redis_url,
        cluster=args.cluster,
        policy=args.policy,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        kv_cache_mib=args.kv_cache_mib,
        max_model_len=args.max_model_len,
        kv_transport=args.kv_transport,
        api_keys=tuple(dict.fromkeys(keys)),
        tracing=TracingFlags(exporter=args.otel_exporter, endpoint=args.otel_endpoint, file=args.otel_file),
        ready_timeout_s=args.ready_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        max_num_seqs=args.max_num_seqs,
        autoscale=_autoscaler_config(args) if args.autoscale else None,
    )
    logging.basicConfig(level=logging.INFO, format="tandem up: %(levelname)s %(message)s", stream=sys.stderr)
    return run_up(config, _up_state_file(), placement=_ray_placement(args, config))


def _ray_placement(args: argparse.Namespace, config: LocalClusterConfig) -> RayCluster | None:
    """`tandem up --ray [ADDRESS]`: the workers as Ray actors (None: local processes)."""
    if args.ray is None:
        return None
    import os

    from tandem.launcher.ray_auth import RayAuth
    from tandem.launcher.ray_cluster import RayCluster, RayConfig

    auth = RayAuth.from_environ(os.environ, args.ray_auth_token_file, Path.home())
    ray_config = RayConfig(
        address=None if args.ray == RAY_OWN_HEAD else args.ray, auth=auth, cpus_per_worker=args.ray_cpus_per_worker
    )
    return RayCluster(config, ray_config)


def cmd_drain(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tandem.worker.drain import DrainError, drain_worker

    try:
        progress = drain_worker(args.address, args.timeout_s)
    except DrainError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"event": "drained" if progress.idle else "drain_timeout", "address": args.address, **asdict(progress)}
        ),
        flush=True,
    )
    return 0 if progress.idle else 1


def cmd_status(args: argparse.Namespace) -> int:
    from tandem.launcher.state_file import read_state
    from tandem.launcher.status import run_status

    path = _up_state_file()
    state = read_state(path)
    redis_url = args.redis_url or (state.redis_url if state is not None else None)
    if redis_url is None:
        print(
            f"tandem: error: no running `tandem up` found ({path} does not exist); pass --redis-url URL",
            file=sys.stderr,
        )
        return 1
    from_state = state is not None and state.redis_url == redis_url
    if state is not None and from_state and not state.owner_running():
        print(f"tandem: warning: {path} is stale: tandem up (pid {state.pid}) is not running", file=sys.stderr)
    cluster = args.cluster or (state.cluster if state is not None and from_state else "default")
    return run_status(redis_url, cluster, as_json=args.json)


def _autoscaler_config(args: argparse.Namespace):  # -> AutoscalerConfig
    """The autoscaler's policy config, from its flags (the one place they are read)."""
    from tandem.autoscaler.config import AutoscalerConfig, DecodePolicy, PrefillPolicy

    return AutoscalerConfig(
        prefill=PrefillPolicy(
            min_replicas=args.prefill_min,
            max_replicas=args.prefill_max,
            target_queued_tokens_per_replica=args.prefill_target_queued_tokens,
        ),
        decode=DecodePolicy(
            min_replicas=args.decode_min,
            max_replicas=args.decode_max,
            target_waiting_per_replica=args.decode_target_waiting,
            target_kv_usage=args.decode_target_kv_usage,
        ),
        interval_s=args.interval_s,
        stabilisation_window_s=args.stabilisation_window_s,
        up_cooldown_s=args.up_cooldown_s,
        down_cooldown_s=args.down_cooldown_s,
        max_signal_age_s=args.max_signal_age_s,
        min_prefill_per_decode=args.min_prefill_per_decode,
        max_prefill_per_decode=args.max_prefill_per_decode,
    )


def _kubernetes_actuator(args: argparse.Namespace):  # -> KubernetesActuator
    from tandem.autoscaler.kubernetes import KubernetesActuator, apps_v1_api, in_cluster_namespace
    from tandem.common.workers import WorkerRole

    return KubernetesActuator(
        namespace=args.namespace or in_cluster_namespace(),
        deployments={WorkerRole.PREFILL: args.prefill_deployment, WorkerRole.DECODE: args.decode_deployment},
        api=apps_v1_api(args.kubeconfig),
    )


AUTOSCALER_ACTUATORS = {"kubernetes": _kubernetes_actuator}  # the `tandem autoscaler --actuator` choices


def cmd_autoscaler(args: argparse.Namespace) -> int:
    import logging

    import redis

    from tandem.autoscaler.autoscaler import Autoscaler, run
    from tandem.autoscaler.metrics import AutoscalerMetrics
    from tandem.common.cluster_state import ClusterState

    config = _autoscaler_config(args)
    logging.basicConfig(level=logging.INFO, format="tandem autoscaler: %(levelname)s %(message)s", stream=sys.stderr)
    client = redis.Redis.from_url(args.redis, socket_timeout=5.0, socket_connect_timeout=5.0)
    actuator = AUTOSCALER_ACTUATORS[args.actuator](args)
    try:
        metrics = AutoscalerMetrics()
        autoscaler = Autoscaler(ClusterState(client, args.cluster), actuator, config, metrics)
        return run(autoscaler, metrics, args.host, args.metrics_port)
    finally:
        actuator.close()
        client.close()


def _add_autoscale_policy_flags(parser: argparse.ArgumentParser) -> None:
    """The policy flags `_autoscaler_config` reads, shared by `tandem autoscaler` and `tandem up --autoscale`."""
    from tandem.autoscaler.config import AutoscalerConfig, DecodePolicy, PrefillPolicy

    a = parser
    a.add_argument("--prefill-min", type=int, default=PrefillPolicy.min_replicas)
    a.add_argument("--prefill-max", type=int, default=PrefillPolicy.max_replicas)
    a.add_argument("--decode-min", type=int, default=DecodePolicy.min_replicas)
    a.add_argument("--decode-max", type=int, default=DecodePolicy.max_replicas)
    a.add_argument(
        "--prefill-target-queued-tokens",
        type=int,
        default=PrefillPolicy.target_queued_tokens_per_replica,
        help="queued prefill tokens per prefill replica",
    )
    a.add_argument(
        "--decode-target-waiting",
        type=float,
        default=DecodePolicy.target_waiting_per_replica,
        help="waiting requests per decode replica",
    )
    a.add_argument(
        "--decode-target-kv-usage",
        type=float,
        default=DecodePolicy.target_kv_usage,
        help="KV cache use of the decode pool, 0 to 1",
    )
    for flag in (
        "interval_s",
        "stabilisation_window_s",
        "up_cooldown_s",
        "down_cooldown_s",
        "max_signal_age_s",
        "min_prefill_per_decode",
        "max_prefill_per_decode",
    ):
        a.add_argument(
            "--" + flag.replace("_", "-"),
            type=float,
            default=getattr(AutoscalerConfig, flag),
            help="default: %(default)s",
        )


def _add_autoscaler_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("autoscaler", help="scale the prefill and decode pools on their queues (runs until SIGTERM)")
    a.add_argument("--redis", required=True, help="Redis URL of the cluster state")
    a.add_argument("--cluster", default="default")
    a.add_argument("--actuator", default="kubernetes", choices=sorted(AUTOSCALER_ACTUATORS))
    a.add_argument(
        "--namespace",
        default=None,
        help="namespace of the Deployments (default: the pod's own, from its service account, else 'default')",
    )
    a.add_argument("--kubeconfig", type=Path, default=None, help="kubeconfig file (default: in-cluster config)")
    a.add_argument("--prefill-deployment", default="tandem-prefill")
    a.add_argument("--decode-deployment", default="tandem-decode")
    _add_autoscale_policy_flags(a)
    a.add_argument("--host", default="127.0.0.1", help="bind address of the metrics server")
    a.add_argument("--metrics-port", type=int, default=9400, help="serve Prometheus /metrics here (0: a free port)")
    a.set_defaults(func=cmd_autoscaler)


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
        _add_tracing_flags(w)
        w.set_defaults(func=cmd_worker)

    gw = sub.add_parser("gateway", help="run the OpenAI-compatible gateway (HTTP)")
    gw.add_argument("--model", type=Path, default=None, help="local HF model directory (tokenizer, config)")
    gw.add_argument("--served-model-name", default=None, help="the `model` clients send (default: directory name)")
    gw.add_argument("--model-id", default=None, help="model id in block hashes; must equal the workers'")
    gw.add_argument("--max-model-len", type=int, default=None)
    gw.add_argument("--block-size", type=int, default=16, help="must equal the workers' block size")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    gw.add_argument("--redis", required=True, help="Redis URL of the cluster state")
    gw.add_argument("--cluster", default="default")
    gw.add_argument("--policy", default="prefix_aware", help="round_robin | least_loaded | prefix_aware")
    gw.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=256,
        help="uncached prompt tokens under which the decode worker prefills locally",
    )
    gw.add_argument(
        "--api-key", action="append", default=None, help="accepted API key (repeatable; also TANDEM_API_KEYS)"
    )
    gw.add_argument("--max-n", type=int, default=8)
    gw.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    gw.add_argument("--prefill-timeout-s", type=float, default=120.0)
    gw.add_argument("--decode-idle-timeout-s", type=float, default=60.0)
    gw.add_argument("--rate-limit-rpm", type=int, default=None, help="requests per minute per API key")
    gw.add_argument("--rate-limit-tpm", type=int, default=None, help="prompt + max tokens per minute per API key")
    _add_tracing_flags(gw)
    gw.set_defaults(func=cmd_gateway)

    up = sub.add_parser("up", help="start a whole local cluster (Redis, workers, gateway) and wait")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers (0: colocated, decode workers prefill)")
    up.add_argument("--decode", type=int, default=1, help="decode workers (>= 1)")
    up.add_argument("--model", type=Path, default=None, help="local HF model directory (default: tiny model)")
    up.add_argument("--redis-url", default=None, help="use this Redis (default: start a private redis-server)")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument("--port", type=int, default=8000, help="gateway port (0 picks a free one)")
    up.add_argument("--cluster", default="default", help="cluster name (Redis key prefix)")
    up.add_argument("--policy", default=None, help="routing policy: round_robin | least_loaded | prefix_aware")
    up.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=None,
        help="uncached prompt tokens under which a decode worker prefills locally (gateway default)",
    )
    up.add_argument("--kv-cache-mib", type=int, default=None, help="KV cache per worker (worker default)")
    up.add_argument("--max-model-len", type=int, default=None)
    up.add_argument("--kv-transport", default="grpc", choices=["grpc", "torch"])
    up.add_argument(
        "--api-key", action="append", default=None, help="accepted API key (repeatable; also TANDEM_API_KEYS)"
    )
    up.add_argument("--ready-timeout-s", type=float, default=180.0, help="bound on start-up")
    up.add_argument("--drain-timeout-s", type=float, default=30.0, help="bound on each worker's drain at stop")
    up.add_argument("--max-num-seqs", type=int, default=None, help="sequences per worker step (worker default)")
    up.add_argument(
        "--autoscale",
        action="store_true",
        help="resize the pools on their queue depth between --prefill-min/max and --decode-min/max",
    )
    _add_autoscale_policy_flags(up)
    up.add_argument(
        "--ray",
        nargs="?",
        const=RAY_OWN_HEAD,
        default=None,
        metavar="ADDRESS",
        help="run the workers as Ray actors on the Ray cluster at ADDRESS (host:port of its GCS, "
        "or ray://host:port); without ADDRESS, on a private Ray head started and stopped here",
    )
    up.add_argument(
        "--ray-auth-token-file",
        type=Path,
        default=None,
        help="Ray auth token to present (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH); default: Ray's "
        "own RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, if any",
    )
    up.add_argument(
        "--ray-cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs each worker actor asks Ray for (a cluster with GPUs gives each worker one GPU)",
    )
    _add_tracing_flags(up)
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="live workers and pool load of a cluster, from Redis")
    status.add_argument("--redis-url", default=None, help="default: the running `tandem up` (its up.json)")
    status.add_argument("--cluster", default=None, help="default: the running `tandem up`'s, else 'default'")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(func=cmd_status)

    _add_autoscaler_parser(sub)

    drain = sub.add_parser("drain", help="drain a worker before it stops (scale-down, Kubernetes preStop)")
    drain.add_argument("--address", required=True, help="the worker's gRPC host:port")
    drain.add_argument("--timeout-s", type=float, default=30.0, help="wait at most this long for it to be idle")
    drain.set_defaults(func=cmd_drain)

    bench = sub.add_parser("bench", help="benchmarks that print ratios measured in one run; serve: load test")
    bench.add_argument(
        "target",
        choices=["engine", "kernels", "kv", "gateway", "serve"],
        help="serve FLAGS: the load generator, `python -m tandem.loadtest run FLAGS` (main() forwards it)",
    )
    bench.add_argument("--model", type=Path, default=None)
    bench.add_argument("--prompt-len", type=int, default=32)
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "serve"]:  # forwarded whole: the load generator reads its own flags
        from tandem.loadtest.__main__ import main as loadtest_main

        raise SystemExit(loadtest_main(["run", *argv[2:]]))
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ValueError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        code = 2
    raise SystemExit(code)
