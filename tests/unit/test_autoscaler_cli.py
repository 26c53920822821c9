"""`tandem autoscaler` flags -> the exact `AutoscalerConfig` (built in one place in the CLI)."""

from __future__ import annotations

import math

from tandem.autoscaler.config import AutoscalerConfig, DecodePolicy, PrefillPolicy
from tandem.cli import build_parser
from tandem.cli.autoscaler import autoscaler_config


def test_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["autoscaler", "--redis", "redis://r:6379/0"])
    assert autoscaler_config(args) == AutoscalerConfig()
    assert (
        args.cluster,
        args.actuator,
        args.namespace,
        args.kubeconfig,
        args.prefill_deployment,
        args.decode_deployment,
        args.host,
        args.metrics_port,
    ) == ("default", "kubernetes", None, None, "tandem-prefill", "tandem-decode", "127.0.0.1", 9400)


def test_every_policy_flag_reaches_the_config():
    args = build_parser().parse_args(
        [
            "autoscaler",
            "--redis",
            "redis://r:6379/0",
            "--cluster",
            "prod",
            "--actuator",
            "kubernetes",
            "--namespace",
            "serving",
            "--kubeconfig",
            "/k/config",
            "--prefill-deployment",
            "p",
            "--decode-deployment",
            "d",
            "--prefill-min",
            "0",
            "--prefill-max",
            "6",
            "--decode-min",
            "2",
            "--decode-max",
            "12",
            "--prefill-target-queued-tokens",
            "4096",
            "--decode-target-waiting",
            "2.5",
            "--decode-target-kv-usage",
            "0.7",
            "--interval-s",
            "5",
            "--stabilisation-window-s",
            "120",
            "--up-cooldown-s",
            "20",
            "--down-cooldown-s",
            "90",
            "--max-signal-age-s",
            "10",
            "--min-prefill-per-decode",
            "0.25",
            "--max-prefill-per-decode",
            "inf",
            "--host",
            "0.0.0.0",
            "--metrics-port",
            "9500",
        ]
    )
    assert autoscaler_config(args) == AutoscalerConfig(
        prefill=PrefillPolicy(min_replicas=0, max_replicas=6, target_queued_tokens_per_replica=4096),
        decode=DecodePolicy(min_replicas=2, max_replicas=12, target_waiting_per_replica=2.5, target_kv_usage=0.7),
        interval_s=5.0,
        stabilisation_window_s=120.0,
        up_cooldown_s=20.0,
        down_cooldown_s=90.0,
        max_signal_age_s=10.0,
        min_prefill_per_decode=0.25,
        max_prefill_per_decode=math.inf,
    )
    assert (
        args.cluster,
        args.namespace,
        str(args.kubeconfig),
        args.prefill_deployment,
        args.decode_deployment,
        args.host,
        args.metrics_port,
    ) == ("prod", "serving", "/k/config", "p", "d", "0.0.0.0", 9500)
