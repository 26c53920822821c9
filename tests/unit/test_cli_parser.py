"""The `tandem` command line: every flag of the old hand-written parser still exists with the
same default, the service commands build their exact configs, and a command only loads what
it parses."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.cli import COMMANDS, build_parser
from tandem.cli.cluster import up_config
from tandem.cli.serve import gateway_config, worker_config
from tandem.common.plane_auth import TOKEN_ENV, ClusterToken, PlaneAuth
from tandem.common.tracing import TracingConfig
from tandem.common.workers import WorkerRole
from tandem.engine.config import EngineConfig
from tandem.gateway.config import GatewayConfig
from tandem.launcher.config import LocalClusterConfig
from tandem.worker.config import WorkerConfig

# The flags and defaults of every command before the flags were generated from the configs.
# `tandem up` said None for "the child's default"; it now shows that default (marked).
LEGACY = {
    "generate": {'--model': None, '--block-size': 16, '--num-blocks': None, '--kv-cache-mib': 256, '--max-num-batched-tokens': 2048, '--max-num-seqs': 64, '--max-prefill-chunk-tokens': None, '--max-model-len': None, '--attention-backend': 'auto', '--device': 'auto', '--dtype': None, '--num-threads': None, '--max-tokens': 32, '--temperature': 0.0, '--top-p': 1.0, '--top-k': None, '--seed': None, '--ignore-eos': False, '--chat': False},  # noqa: E501
    "prefill": {'--model': None, '--block-size': 16, '--num-blocks': None, '--kv-cache-mib': 256, '--max-num-batched-tokens': 2048, '--max-num-seqs': 64, '--max-prefill-chunk-tokens': None, '--max-model-len': None, '--attention-backend': 'auto', '--device': 'auto', '--dtype': None, '--num-threads': None, '--worker-id': None, '--host': '127.0.0.1', '--port': 0, '--advertise-host': None, '--metrics-port': None, '--redis': None, '--cluster': 'default', '--heartbeat-ttl-s': 5.0, '--lease-ttl-s': 30.0, '--kv-transport': 'grpc', '--transfer-timeout-s': 10.0, '--drain-timeout-s': 30.0, '--otel-exporter': 'none', '--otel-endpoint': None, '--otel-file': None},  # noqa: E501
    "gateway": {'--model': None, '--served-model-name': None, '--model-id': None, '--max-model-len': None, '--block-size': 16, '--host': '127.0.0.1', '--port': 8000, '--redis': None, '--cluster': 'default', '--policy': 'prefix_aware', '--local-prefill-max-tokens': 256, '--api-key': None, '--max-n': 8, '--max-body-bytes': 8388608, '--prefill-timeout-s': 120.0, '--decode-idle-timeout-s': 60.0, '--rate-limit-rpm': None, '--rate-limit-tpm': None, '--otel-exporter': 'none', '--otel-endpoint': None, '--otel-file': None},  # noqa: E501
    "up": {'--prefill': 1, '--decode': 1, '--model': None, '--redis-url': None, '--host': '127.0.0.1', '--port': 8000, '--cluster': 'default', '--policy': 'prefix_aware', '--local-prefill-max-tokens': 256, '--kv-cache-mib': 256, '--max-model-len': None, '--kv-transport': 'grpc', '--api-key': None, '--ready-timeout-s': 180.0, '--drain-timeout-s': 30.0, '--max-num-seqs': 64, '--autoscale': False, '--prefill-min': 1, '--prefill-max': 4, '--decode-min': 1, '--decode-max': 4, '--prefill-target-queued-tokens': 2048, '--decode-target-waiting': 4.0, '--decode-target-kv-usage': 0.8, '--interval-s': 15.0, '--stabilisation-window-s': 300.0, '--up-cooldown-s': 30.0, '--down-cooldown-s': 60.0, '--max-signal-age-s': 15.0, '--min-prefill-per-decode': 0.0, '--max-prefill-per-decode': math.inf, '--ray': None, '--ray-auth-token-file': None, '--ray-cpus-per-worker': 1.0, '--otel-exporter': 'none', '--otel-endpoint': None, '--otel-file': None},  # noqa: E501
    "status": {'--redis-url': None, '--cluster': None, '--json': False},
    "autoscaler": {'--redis': None, '--cluster': 'default', '--actuator': 'kubernetes', '--namespace': None, '--kubeconfig': None, '--prefill-deployment': 'tandem-prefill', '--decode-deployment': 'tandem-decode', '--prefill-min': 1, '--prefill-max': 4, '--decode-min': 1, '--decode-max': 4, '--prefill-target-queued-tokens': 2048, '--decode-target-waiting': 4.0, '--decode-target-kv-usage': 0.8, '--interval-s': 15.0, '--stabilisation-window-s': 300.0, '--up-cooldown-s': 30.0, '--down-cooldown-s': 60.0, '--max-signal-age-s': 15.0, '--min-prefill-per-decode': 0.0, '--max-prefill-per-decode': math.inf, '--host': '127.0.0.1', '--metrics-port': 9400},  # noqa: E501
    "drain": {'--address': None, '--timeout-s': 30.0},
    "bench": {'--model': None, '--prompt-len': 32, '--max-tokens': 128},
}  # fmt: skip
LEGACY["decode"] = LEGACY["prefill"]


def flag_defaults(parser: argparse.ArgumentParser, command: str) -> dict[str, object]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = sub.choices[command]._actions
    return {flag: action.default for action in actions for flag in action.option_strings}


@pytest.mark.parametrize("command", sorted(LEGACY))
def test_every_legacy_flag_keeps_its_default(command: str) -> None:
    defaults = flag_defaults(build_parser(), command)
    assert {flag: defaults.get(flag, "<missing>") for flag in LEGACY[command]} == LEGACY[command]
    assert flag_defaults(build_parser(only=command), command) == defaults


def test_worker_command_builds_its_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "  the-token-of-this-test \n")
    args = build_parser().parse_args(
        ["decode", "--model", str(tmp_path), "--host", "10.1.2.3", "--port", "50051", "--kv-cache-mib", "8"]
        + ["--redis", "redis://r:6379/0", "--otel-exporter", "file", "--otel-file", "/t/spans.jsonl"]
    )
    assert worker_config(args) == WorkerConfig(
        role=WorkerRole.DECODE,
        worker_id="decode-50051",
        model_dir=tmp_path,
        engine=EngineConfig(kv_cache_bytes=8 * 1024 * 1024),
        host="10.1.2.3",
        port=50051,
        redis_url="redis://r:6379/0",
        tracing=TracingConfig(exporter="file", file_path=Path("/t/spans.jsonl")),
        plane=PlaneAuth(token=ClusterToken("the-token-of-this-test")),
    )


def test_gateway_and_up_add_the_environment_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_API_KEYS", " e1, ,e2")
    monkeypatch.delenv(TOKEN_ENV)
    args = build_parser().parse_args(["gateway", "--model", str(tmp_path), "--redis", "redis://r", "--api-key", "f"])
    assert gateway_config(args) == GatewayConfig(model_dir=tmp_path, redis_url="redis://r", api_keys=("f", "e1", "e2"))
    config = up_config(build_parser().parse_args(["up", "--api-key", "f", "--port", "0"]))
    assert config == LocalClusterConfig(
        gateway=replace(LocalClusterConfig().gateway, port=0, api_keys=("f", "e1", "e2"))
    )
    monkeypatch.delenv("TANDEM_API_KEYS")
    assert up_config(build_parser().parse_args(["up"])) == LocalClusterConfig()


def test_commands_and_python_dash_m() -> None:
    assert list(COMMANDS) == [
        "generate",
        "prefill",
        "decode",
        "gateway",
        "up",
        "status",
        "autoscaler",
        "drain",
        "bench",
        "simulate",
        "plan",
    ]
    out = subprocess.run([sys.executable, "-m", "tandem", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "{generate,prefill,decode,gateway,up,status,autoscaler,drain,bench,simulate,plan}" in out.stdout


@pytest.mark.parametrize("argv", [["drain", "--address", "h:1"], ["status"], ["autoscaler", "--redis", "redis://r"]])
def test_a_command_only_loads_what_it_parses(argv: list[str]) -> None:
    code = (
        "import sys; from tandem.cli import build_parser; "
        f"build_parser({argv[0]!r}).parse_args({argv!r}); "
        "print(sorted(m for m in ('torch', 'tandem.engine.config', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "[]\n"), out.stderr


@pytest.mark.parametrize("argv", [["up"], ["prefill"], ["gateway", "--redis", "redis://r"]])
def test_building_a_config_loads_no_torch(argv: list[str]) -> None:
    """The configs name their registries' entries without importing them: `tandem up` (and the
    parsers of the worker and gateway commands) read every worker option but load no torch."""
    code = (
        "import sys; from tandem.cli import build_parser; "
        f"build_parser({argv[0]!r}).parse_args({argv!r}); "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "[]\n"), out.stderr
