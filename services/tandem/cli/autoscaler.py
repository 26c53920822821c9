"""`tandem autoscaler`: the autoscaler as a service (Kubernetes Deployments). Its flags are the
fields of `AutoscalerServiceConfig`; the policy flags are `AutoscalerConfig`'s, shared with
`tandem up --autoscale`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tandem.common.options import add_flags, from_args

if TYPE_CHECKING:
    from tandem.autoscaler.actuator import Actuator
    from tandem.autoscaler.config import AutoscalerServiceConfig


def service_config(args: argparse.Namespace) -> AutoscalerServiceConfig:
    """The service config, from the flags `add_flags(parser, AutoscalerServiceConfig)` made."""
    from tandem.autoscaler.config import AutoscalerServiceConfig

    config: AutoscalerServiceConfig = from_args(AutoscalerServiceConfig, args)
    return config


def _actuator(config: AutoscalerServiceConfig) -> Actuator:
    """The one service actuator, `kubernetes` (`SERVICE_ACTUATORS`)."""
    from tandem.autoscaler.kubernetes import KubernetesActuator, apps_v1_api, in_cluster_namespace
    from tandem.common.workers import WorkerRole

    target = config.kubernetes
    return KubernetesActuator(
        namespace=target.namespace or in_cluster_namespace(),
        deployments={WorkerRole.PREFILL: target.prefill_deployment, WorkerRole.DECODE: target.decode_deployment},
        api=apps_v1_api(target.kubeconfig),
    )


def add_autoscaler_flags(parser: argparse.ArgumentParser) -> None:
    from tandem.autoscaler.config import AutoscalerServiceConfig

    add_flags(parser, AutoscalerServiceConfig)
    parser.set_defaults(func=cmd_autoscaler)


def cmd_autoscaler(args: argparse.Namespace) -> int:
    import logging

    import redis

    from tandem.autoscaler.autoscaler import Autoscaler, run
    from tandem.autoscaler.metrics import AutoscalerMetrics
    from tandem.common.cluster_state import ClusterState

    config = service_config(args)
    logging.basicConfig(level=logging.INFO, format="tandem autoscaler: %(levelname)s %(message)s", stream=sys.stderr)
    client = redis.Redis.from_url(config.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    actuator = _actuator(config)
    try:
        metrics = AutoscalerMetrics()
        autoscaler = Autoscaler(ClusterState(client, config.cluster), actuator, config.policy, metrics)
        return run(autoscaler, metrics, config.host, config.metrics_port)
    finally:
        actuator.close()
        client.close()
