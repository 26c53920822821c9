"""`tandem autoscaler`: the autoscaler as a service (Kubernetes Deployments). Its policy flags
are `AutoscalerConfig`'s fields, shared with `tandem up --autoscale`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.common.options import add_flags, from_args

if TYPE_CHECKING:
    from tandem.autoscaler.actuator import Actuator
    from tandem.autoscaler.config import AutoscalerConfig


def autoscaler_config(args: argparse.Namespace) -> AutoscalerConfig:
    """The policy config, from the flags `add_flags(parser, AutoscalerConfig)` made."""
    from tandem.autoscaler.config import AutoscalerConfig

    config: AutoscalerConfig = from_args(AutoscalerConfig, args)
    return config


def _kubernetes_actuator(args: argparse.Namespace) -> Actuator:
    from tandem.autoscaler.kubernetes import KubernetesActuator, apps_v1_api, in_cluster_namespace
    from tandem.common.workers import WorkerRole

    return KubernetesActuator(
        namespace=args.namespace or in_cluster_namespace(),
        deployments={WorkerRole.PREFILL: args.prefill_deployment, WorkerRole.DECODE: args.decode_deployment},
        api=apps_v1_api(args.kubeconfig),
    )


# The `--actuator` choices. `local` and `ray` act on a cluster that `tandem up` owns, from inside it.
ACTUATORS: dict[str, Callable[[argparse.Namespace], Actuator]] = {"kubernetes": _kubernetes_actuator}


def add_autoscaler_flags(parser: argparse.ArgumentParser) -> None:
    from tandem.autoscaler.config import AutoscalerConfig

    a = parser
    a.add_argument("--redis", required=True, help="Redis URL of the cluster state")
    a.add_argument("--cluster", default="default")
    a.add_argument("--actuator", default="kubernetes", choices=sorted(ACTUATORS))
    a.add_argument(
        "--namespace",
        default=None,
        help="namespace of the Deployments (default: the pod's own, from its service account, else 'default')",
    )
    a.add_argument("--kubeconfig", type=Path, default=None, help="kubeconfig file (default: in-cluster config)")
    a.add_argument("--prefill-deployment", default="tandem-prefill")
    a.add_argument("--decode-deployment", default="tandem-decode")
    add_flags(a, AutoscalerConfig)
    a.add_argument("--host", default="127.0.0.1", help="bind address of the metrics server")
    a.add_argument("--metrics-port", type=int, default=9400, help="serve Prometheus /metrics here (0: a free port)")
    a.set_defaults(func=cmd_autoscaler)


def cmd_autoscaler(args: argparse.Namespace) -> int:
    import logging

    import redis

    from tandem.autoscaler.autoscaler import Autoscaler, run
    from tandem.autoscaler.metrics import AutoscalerMetrics
    from tandem.common.cluster_state import ClusterState

    config = autoscaler_config(args)
    logging.basicConfig(level=logging.INFO, format="tandem autoscaler: %(levelname)s %(message)s", stream=sys.stderr)
    client = redis.Redis.from_url(args.redis, socket_timeout=5.0, socket_connect_timeout=5.0)
    actuator = ACTUATORS[args.actuator](args)
    try:
        metrics = AutoscalerMetrics()
        autoscaler = Autoscaler(ClusterState(client, args.cluster), actuator, config, metrics)
        return run(autoscaler, metrics, args.host, args.metrics_port)
    finally:
        actuator.close()
        client.close()
