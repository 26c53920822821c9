"""The cluster commands: `tandem up` (a local cluster), `tandem status` and `tandem drain`.

`tandem up`'s flags are `LocalClusterConfig`'s fields, its worker and gateway templates'
included (one flag for an option both share, e.g. `--max-model-len`); the Ray flags are
`RayConfig`'s, with the auth token read from Ray's own environment variables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.cli.inputs import api_keys, plane_auth, redis_url
from tandem.common.options import add_flags, from_args

if TYPE_CHECKING:
    from tandem.common.plane_auth import ClusterToken
    from tandem.launcher.config import LocalClusterConfig
    from tandem.launcher.ray_cluster import RayCluster

RAY_OWN_HEAD = "local"  # `tandem up --ray` without an address: start a private Ray head


def _up_state_file() -> Path:
    """Where `tandem up` records its cluster for `tandem status`: $TANDEM_CACHE_DIR/up.json."""
    from tandem.engine.tiny_model import default_cache_dir
    from tandem.launcher.state_file import STATE_FILE_NAME

    return default_cache_dir() / STATE_FILE_NAME


# ---- tandem up -----------------------------------------------------------------------------
def add_up_flags(parser: argparse.ArgumentParser) -> None:
    from tandem.launcher.config import LocalClusterConfig
    from tandem.launcher.ray_config import RayConfig

    add_flags(parser, LocalClusterConfig)
    parser.add_argument(
        "--ray",
        nargs="?",
        const=RAY_OWN_HEAD,
        default=None,
        metavar="ADDRESS",
        help="run the workers as Ray actors on the Ray cluster at ADDRESS (host:port of its GCS, "
        "or ray://host:port); without ADDRESS, on a private Ray head started and stopped here",
    )
    parser.add_argument(
        "--ray-auth-token-file",
        type=Path,
        default=None,
        help="Ray auth token to present (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH); default: Ray's "
        "own RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, if any",
    )
    add_flags(parser, RayConfig)
    parser.set_defaults(func=cmd_up)


def up_config(args: argparse.Namespace) -> LocalClusterConfig:
    """The cluster's config: its flags plus the API keys of TANDEM_API_KEYS, the Redis URL of
    TANDEM_REDIS_URL and the cluster token of TANDEM_CLUSTER_TOKEN (without one, `tandem up`
    generates one, unless `--insecure-no-auth`)."""
    from tandem.launcher.config import LocalClusterConfig

    plane = plane_auth(args.cluster_token_file, args.insecure_no_auth)
    given: dict[str, Any] = {
        "gateway.api_keys": api_keys(args.api_key or ()),
        "redis_url": redis_url(args.redis_url),
        "worker.plane": plane,
        "gateway.plane": plane,
    }
    config: LocalClusterConfig = from_args(LocalClusterConfig, args, **given)
    return config


def cmd_up(args: argparse.Namespace) -> int:
    import logging

    from tandem.launcher.up import run_up

    config = up_config(args)
    logging.basicConfig(level=logging.INFO, format="tandem up: %(levelname)s %(message)s", stream=sys.stderr)
    return run_up(config, _up_state_file(), placement=_ray_placement(args, config))


def _ray_placement(args: argparse.Namespace, config: LocalClusterConfig) -> RayCluster | None:
    """`tandem up --ray [ADDRESS]`: the workers as Ray actors (None: local processes)."""
    if args.ray is None:
        return None
    import os

    from tandem.launcher.ray_auth import RayAuth
    from tandem.launcher.ray_cluster import RayCluster
    from tandem.launcher.ray_config import RayConfig

    auth = RayAuth.from_environ(os.environ, args.ray_auth_token_file, Path.home())
    address = None if args.ray == RAY_OWN_HEAD else args.ray
    return RayCluster(config, from_args(RayConfig, args, address=address, auth=auth))


# ---- tandem status ---------------------------------------------------------------------------
def add_status_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        "--redis-url",
        dest="redis",
        default=None,
        help="Redis URL of the cluster (default: $TANDEM_REDIS_URL, else the running `tandem up`'s up.json)",
    )
    parser.add_argument("--cluster", default=None, help="default: the running `tandem up`'s, else 'default'")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """`--redis`, else TANDEM_REDIS_URL, else the state file (`find_target`); a state file whose
    cluster is gone is an error (exit 1), never a stale table."""
    import os

    from tandem.common.redis_url import REDIS_URL_ENV
    from tandem.launcher.state_file import read_state
    from tandem.launcher.status import NoClusterError, find_target, run_status

    path = _up_state_file()
    try:
        state = read_state(path)
    except ValueError as exc:
        print(f"tandem: error: {path} is not a `tandem up` state file ({exc}); pass --redis URL", file=sys.stderr)
        return 1
    try:
        target = find_target(args.redis, os.environ.get(REDIS_URL_ENV), args.cluster, state, path)
    except NoClusterError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 1
    return run_status(target.redis_url, target.cluster, as_json=args.json, target=target)


# ---- tandem drain ----------------------------------------------------------------------------
def add_drain_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", required=True, help="the worker's gRPC host:port")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="wait at most this long for it to be idle")
    parser.add_argument(
        "--cluster-token-file",
        type=Path,
        default=None,
        help="file holding the cluster token (default: $TANDEM_CLUSTER_TOKEN, else the running `tandem up`'s)",
    )
    parser.set_defaults(func=cmd_drain)


def cmd_drain(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tandem.worker.drain import DrainError, drain_worker

    try:
        progress = drain_worker(args.address, args.timeout_s, token=_drain_token(args.cluster_token_file))
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


def _drain_token(token_file: Path | None) -> ClusterToken | None:
    """The cluster token to present: `--cluster-token-file`, else TANDEM_CLUSTER_TOKEN, else the
    one of the running `tandem up` (its state file, readable by its owner only)."""
    from tandem.launcher.state_file import read_state

    token = plane_auth(token_file, False).token
    if token is not None:
        return token
    state = read_state(_up_state_file())
    return state.cluster_token if state is not None and state.owner_running() else None
