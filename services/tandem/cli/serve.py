"""The services: `tandem prefill` and `tandem decode` (workers, gRPC) and `tandem gateway`
(HTTP). Their flags are their configs' fields (`WorkerConfig`, `GatewayConfig`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tandem.cli.inputs import api_keys, model_dir, plane_auth, redis_url
from tandem.common.options import add_flags, from_args

if TYPE_CHECKING:
    from tandem.gateway.config import GatewayConfig
    from tandem.worker.config import WorkerConfig


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    from tandem.worker.config import WorkerConfig

    add_flags(parser, WorkerConfig)
    parser.set_defaults(func=cmd_worker)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker's config: its flags, the role its command names, and the fallbacks of the
    model (the tiny model) and of the worker id (`{role}-{port}`)."""
    from tandem.common.workers import WorkerRole
    from tandem.worker.config import WorkerConfig

    role = WorkerRole(args.command)
    config: WorkerConfig = from_args(
        WorkerConfig,
        args,
        role=role,
        worker_id=args.worker_id or f"{role.value}-{args.port}",
        model_dir=model_dir(args.model),
        redis_url=redis_url(args.redis),
        plane=plane_auth(args.cluster_token_file, args.insecure_no_auth),
    )
    return config


def cmd_worker(args: argparse.Namespace) -> int:
    import functools

    from tandem.common.workers import WorkerRole
    from tandem.worker.worker import Worker, run

    config = worker_config(args)
    if config.role is WorkerRole.PREFILL:
        from tandem.prefill.server import add_servicers
    else:
        from tandem.decode.server import add_servicers
    worker = Worker(config)
    return run(worker, functools.partial(add_servicers, worker))


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    from tandem.gateway.config import GatewayConfig

    add_flags(parser, GatewayConfig)
    parser.set_defaults(func=cmd_gateway)


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The gateway's config: its flags, the API keys of TANDEM_API_KEYS, the Redis URL of
    TANDEM_REDIS_URL and the cluster token of TANDEM_CLUSTER_TOKEN (unless flags give them), the
    tiny model's fallback."""
    from tandem.gateway.config import GatewayConfig

    config: GatewayConfig = from_args(
        GatewayConfig,
        args,
        model_dir=model_dir(args.model),
        api_keys=api_keys(args.api_key or ()),
        redis_url=redis_url(args.redis),
        plane=plane_auth(args.cluster_token_file, args.insecure_no_auth),
    )
    return config


def cmd_gateway(args: argparse.Namespace) -> int:
    from tandem.gateway.server import run

    return run(gateway_config(args))
