"""Each option is declared once: every config field has a flag (or says why not), and for every
config class `parse(to_argv(config)) == config`, for defaults and for values that differ."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tandem.autoscaler.config import (
    AutoscalerConfig,
    AutoscalerServiceConfig,
    DecodePolicy,
    KubernetesTarget,
    PrefillPolicy,
)
from tandem.common.options import add_flags, options, parse, to_argv
from tandem.common.tracing import TracingConfig
from tandem.common.workers import WorkerRole
from tandem.engine.config import EngineConfig
from tandem.gateway.config import GatewayConfig
from tandem.gateway.limits import RateLimitConfig
from tandem.kvtransfer.config import KVTransferConfig
from tandem.launcher.config import LocalClusterConfig, gateway_template, worker_template
from tandem.launcher.ray_config import RayConfig
from tandem.scheduler import SchedulerConfig
from tandem.worker.config import WorkerConfig

MiB = 1024 * 1024
WORKER = WorkerConfig(role=WorkerRole.PREFILL, worker_id="p0", model_dir=Path("/models/tiny"))
GATEWAY = GatewayConfig(model_dir=Path("/models/tiny"), redis_url="redis://10.0.0.1:6379/0")
# What each class's parse needs that no flag gives (its command gives it).
GIVEN: dict[type, dict[str, Any]] = {WorkerConfig: {"role": WorkerRole.PREFILL}}

ENGINE = EngineConfig(
    block_size=32,
    num_blocks=100,
    kv_cache_bytes=8 * MiB,
    max_num_batched_tokens=512,
    max_num_seqs=4,
    max_prefill_chunk_tokens=64,
    max_model_len=1024,
    enable_prefix_caching=False,
    attention_backend="torch",
    device="cpu",
    dtype="bfloat16",
    num_threads=2,
    seed=7,
    model_id="m1",
)
KV = KVTransferConfig(
    transport="torch",
    max_chunk_bytes=2 * MiB,
    pull_timeout_s=3.5,
    connect_timeout_s=4.0,
    bind_host="10.0.0.9",
    max_inflight_sends=2,
    max_pairs=3,
    max_staging_bytes=MiB,
    max_blocks_per_pull=99,
)
TRACING = TracingConfig(exporter="otlp", otlp_endpoint="https://collector:4317")
SCHEDULER = SchedulerConfig(
    policy="round_robin",
    block_size=32,
    local_prefill_max_tokens=0,
    queue_weight=0.5,
    kv_weight=2.0,
    refresh_interval_s=1.0,
    speculative_ttl_s=0.0,
    kv_events_block_ms=100,
)
LIMITS = RateLimitConfig(requests_per_minute=60, tokens_per_minute=1000, burst_requests=5, burst_tokens=50)
AUTOSCALE = AutoscalerConfig(
    prefill=PrefillPolicy(min_replicas=0, max_replicas=6, target_queued_tokens_per_replica=4096),
    decode=DecodePolicy(min_replicas=2, max_replicas=12, target_waiting_per_replica=2.5, target_kv_usage=0.7),
    interval_s=5.0,
    stabilisation_window_s=120.0,
    up_cooldown_s=20.0,
    down_cooldown_s=90.0,
    max_signal_age_s=10.0,
    min_prefill_per_decode=0.25,
    max_prefill_per_decode=math.inf,
    tolerance=0.2,
)

# Every config class, with a default and with every flag-bearing field changed.
CASES = [
    (EngineConfig(), ENGINE),
    (KVTransferConfig(), KV),
    (TracingConfig(), TRACING),
    (TracingConfig(), TracingConfig(exporter="file", file_path=Path("/tmp/spans.jsonl"))),
    (SchedulerConfig(), SCHEDULER),
    (RateLimitConfig(), LIMITS),
    (PrefillPolicy(), PrefillPolicy(min_replicas=0, max_replicas=2, target_queued_tokens_per_replica=1)),
    (DecodePolicy(), DecodePolicy(min_replicas=2, max_replicas=3, target_waiting_per_replica=1.5, target_kv_usage=0.5)),
    (AutoscalerConfig(), AUTOSCALE),
    (
        WORKER,
        replace(
            WORKER,
            role=WorkerRole.PREFILL,
            engine=ENGINE,
            host="10.0.0.2",
            port=50051,
            advertise_host="10.0.0.3",
            metrics_port=9000,
            redis_url="redis://r:6379/0",
            cluster="c1",
            heartbeat_ttl_s=2.0,
            lease_ttl_s=9.0,
            inbox_size=8,
            kv_transfer=replace(KV, bind_host="127.0.0.1"),  # no flag: the worker sets its own
            request_timeout_s=60.0,
            drain_timeout_s=5.0,
            tracing=TRACING,
        ),
    ),
    (
        GATEWAY,
        replace(
            GATEWAY,
            served_model_name="tiny",
            model_id="m1",
            max_model_len=1024,
            host="0.0.0.0",
            port=0,
            cluster="c1",
            api_keys=("k2", "k1"),
            max_n=2,
            max_body_bytes=4096,
            prefill_timeout_s=5.0,
            decode_idle_timeout_s=6.0,
            retry_after_s=3,
            scheduler=SCHEDULER,
            rate_limits=LIMITS,
            tracing=TRACING,
        ),
    ),
    (RayConfig(), RayConfig(cpus_per_worker=0.5, head_start_timeout_s=5.0)),
    (
        AutoscalerServiceConfig(redis_url="redis://r:6379/0"),
        AutoscalerServiceConfig(
            redis_url="redis://r:6379/1",
            cluster="c1",
            kubernetes=KubernetesTarget("serving", Path("/k/config"), "p", "d"),
            policy=AUTOSCALE,
            host="0.0.0.0",
            metrics_port=0,
        ),
    ),
    (
        LocalClusterConfig(),
        LocalClusterConfig(
            num_prefill=0,
            num_decode=2,
            model_dir=Path("/"),
            redis_url="redis://r:6379/0",
            worker=replace(worker_template(), cluster="c1", engine=replace(ENGINE, num_threads=None), tracing=TRACING),
            gateway=replace(
                gateway_template(),
                cluster="c1",
                max_model_len=1024,
                model_id="m1",
                api_keys=("k1",),
                scheduler=SCHEDULER,
                tracing=TRACING,
            ),
            ready_timeout_s=5.0,
            gateway_stop_timeout_s=2.0,
            autoscale=AUTOSCALE,
        ),
    ),
]


def ids(case: tuple[Any, Any]) -> str:
    return type(case[0]).__name__


@pytest.mark.parametrize("default, changed", CASES, ids=[ids(c) for c in CASES])
def test_to_argv_parses_back(default: Any, changed: Any) -> None:
    cls = type(default)
    given = GIVEN.get(cls, {})
    assert parse(cls, to_argv(default), **given) == default
    assert parse(cls, to_argv(changed), **given) == changed
    assert changed != default


def test_defaults_write_no_flags_but_the_required_ones() -> None:
    assert to_argv(EngineConfig()) == []
    assert to_argv(LocalClusterConfig()) == []
    assert to_argv(WORKER) == ["--worker-id", "p0", "--model", "/models/tiny"]
    assert to_argv(GATEWAY) == ["--model", "/models/tiny", "--redis", "redis://10.0.0.1:6379/0"]
    assert to_argv(AutoscalerConfig(prefill=PrefillPolicy(max_replicas=6))) == ["--prefill-max", "6"]
    assert to_argv(replace(ENGINE, kv_cache_bytes=3 * MiB))[4:6] == ["--kv-cache-mib", "3"]


def leaf_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every non-config field of `cls`, nested configs flattened."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kinds = [k for k in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(k)]
        if kinds and "no_flag" not in f.metadata:
            names += leaf_fields(kinds[0], f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


# Fields without a flag, and why: the command or the launcher gives them.
NO_FLAG = {
    # the cluster token: read by the command (TANDEM_CLUSTER_TOKEN or --cluster-token-file)
    WorkerConfig: {"role", "kv_transfer.bind_host", "plane.token", "kv_transfer.token"},
    GatewayConfig: {"plane.token"},
    KVTransferConfig: {"token"},
    RayConfig: {"address", "auth"},
    LocalClusterConfig: {
        *(f"worker.{name}" for name in ("role", "worker_id", "model_dir", "host", "port", "advertise_host")),
        *(f"worker.{name}" for name in ("metrics_port", "redis_url", "engine.num_threads", "kv_transfer.bind_host")),
        "gateway.model_dir",
        "gateway.redis_url",
        *("worker.plane.token", "worker.kv_transfer.token", "gateway.plane.token"),
    },
}


@pytest.mark.parametrize("cls", sorted({type(c[0]) for c in CASES}, key=lambda c: c.__name__))
def test_every_field_has_a_flag(cls: type) -> None:
    with_flag = {".".join(o.path) for o in options(cls) if not o.switch}
    assert set(leaf_fields(cls)) - with_flag == NO_FLAG.get(cls, set())


def test_registries_give_the_choices() -> None:
    by_flag = {o.flag: o for o in options(WorkerConfig) + options(GatewayConfig)}
    assert list(by_flag["--kv-transport"].choices) == ["grpc", "tcp", "torch"]
    assert list(by_flag["--policy"].choices) == ["least_loaded", "prefix_aware", "round_robin"]
    assert list(by_flag["--otel-exporter"].choices) == ["none", "otlp", "file"]
    assert "triton" in by_flag["--attention-backend"].choices


def test_a_shared_flag_sets_both_fields_and_must_agree() -> None:
    config = parse(LocalClusterConfig, ["--max-model-len", "64", "--block-size", "32", "--cluster", "c"])
    assert (config.worker.engine.max_model_len, config.gateway.max_model_len) == (64, 64)
    assert (config.worker.engine.block_size, config.gateway.scheduler.block_size) == (32, 32)
    assert (config.worker.cluster, config.gateway.cluster) == ("c", "c")
    parser = argparse.ArgumentParser()
    parser.add_argument("--block-size", dest="block_size", type=int, default=8)
    with pytest.raises(ValueError, match="--block-size is declared twice with different defaults"):
        add_flags(parser, EngineConfig)


def test_argv_refuses_what_flags_cannot_say() -> None:
    with pytest.raises(ValueError, match="--kv-cache-mib counts units of 1048576; 1000 is not a multiple"):
        to_argv(EngineConfig(kv_cache_bytes=1000))
    with pytest.raises(
        ValueError, match=re.escape("--name would take two values: ['--name', 'x'] and ['--name', 'y']")
    ):
        to_argv(Pair(a=Named("x"), b=Named("y")))
    assert to_argv(Pair(a=Named("x"), b=Named("x"))) == ["--name", "x"]


@dataclasses.dataclass(frozen=True)
class Named:
    name: str = "default"


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two nested configs whose `name` fields share one flag."""

    a: Named = dataclasses.field(default_factory=Named)
    b: Named = dataclasses.field(default_factory=Named)


def test_missing_required_values() -> None:
    with pytest.raises(TypeError, match="WorkerConfig.role has no flag here: give it to from_args"):
        parse(WorkerConfig, ["--worker-id", "w", "--model", "/m"])
    with pytest.raises(ValueError, match="--worker-id is required"):
        parse(WorkerConfig, ["--model", "/m"], role=WorkerRole.DECODE)
    with pytest.raises(TypeError, match=r"WorkerConfig has no field \['engine.bogus'\]"):
        parse(WorkerConfig, ["--worker-id", "w", "--model", "/m"], role=WorkerRole.DECODE, **{"engine.bogus": 1})
