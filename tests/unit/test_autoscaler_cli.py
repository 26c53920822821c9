"""`tandem autoscaler` flags -> the exact `AutoscalerServiceConfig` (generated flags, built in one place)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tandem.autoscaler.config import (
    AutoscalerConfig,
    AutoscalerServiceConfig,
    DecodePolicy,
    KubernetesTarget,
    PrefillPolicy,
)
from tandem.cli import build_parser
from tandem.cli.autoscaler import service_config


def test_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["autoscaler", "--redis", "redis://r:6379/0"])
    assert service_config(args) == AutoscalerServiceConfig(redis_url="redis://r:6379/0")
    assert service_config(args) == AutoscalerServiceConfig(
        redis_url="redis://r:6379/0",
        cluster="default",
        actuator="kubernetes",
        kubernetes=KubernetesTarget(None, None, "tandem-prefill", "tandem-decode"),
        policy=AutoscalerConfig(),
        host="127.0.0.1",
        metrics_port=9400,
    )


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
    assert service_config(args).policy == AutoscalerConfig(
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
    config = service_config(args)
    assert (config.redis_url, config.cluster, config.actuator, config.host, config.metrics_port) == (
        "redis://r:6379/0",
        "prod",
        "kubernetes",
        "0.0.0.0",
        9500,
    )
    assert config.kubernetes == KubernetesTarget("serving", Path("/k/config"), "p", "d")


def test_redis_is_required_and_the_actuator_is_a_service_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["autoscaler"])
    assert "the following arguments are required: --redis" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["autoscaler", "--redis", "redis://r", "--actuator", "local"])
    assert "error: argument --actuator: invalid choice: 'local'" in capsys.readouterr().err


def test_service_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="^metrics_port must be <= 65535, got 70000$"):
        AutoscalerServiceConfig(redis_url="redis://r", metrics_port=70000)
    with pytest.raises(ValueError, match="^prefill_deployment must be a non-empty Deployment name$"):
        KubernetesTarget(prefill_deployment="")
