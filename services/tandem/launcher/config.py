"""Configuration of a local cluster (`tandem up`), frozen and validated once, and its children's
configs and command lines.

The workers' and the gateway's options are declared once, in `WorkerConfig` and `GatewayConfig`:
a `LocalClusterConfig` holds one of each as a template (their flags are `tandem up`'s flags), and
each child's config is its template with the child's own values put in (`dataclasses.replace`).
A child's command line is that config written back as flags (`tandem.common.options.to_argv`),
so that the child parses exactly the config built here, but for its secrets: the Redis URL
(it may hold a password) and the cluster token travel in the child's environment
(`ChildSecrets`), never on its command line, which every local user sees in `ps`. These
functions are pure so that tests can read them.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tandem.autoscaler.config import AutoscalerConfig
from tandem.common.options import options, to_argv
from tandem.common.plane_auth import TOKEN_ENV, ClusterToken
from tandem.common.redis_url import REDIS_URL_ENV
from tandem.common.workers import WorkerRole
from tandem.gateway.config import API_KEYS_ENV, GatewayConfig
from tandem.launcher.restarts import RestartPolicy
from tandem.worker.config import WorkerConfig

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
MAX_WORKERS = 64
WORKER_HOST = "127.0.0.1"  # internal services bind loopback (DESIGN section 8)

# Each child's own values: no `tandem up` flag; the templates hold placeholders for them.
WORKER_CHILD_FIELDS = (
    "role",
    "worker_id",
    "model_dir",
    "host",
    "port",
    "advertise_host",
    "metrics_port",
    "redis_url",
    "engine.num_threads",
)
GATEWAY_CHILD_FIELDS = ("model_dir", "redis_url")
_PLACEHOLDER_MODEL = Path("<model>")
_PLACEHOLDER_REDIS = "redis://<redis>"
_SECRET_FIELDS = frozenset({"redis_url"})  # in the environment (`ChildSecrets`), not in argv


@dataclass(frozen=True)
class ChildSecrets:
    """What every child of a local cluster finds in its environment: the Redis URL
    (TANDEM_REDIS_URL; it may hold a password) and the cluster token (TANDEM_CLUSTER_TOKEN;
    None on an insecure plane). The repr hides both."""

    redis_url: str = field(repr=False)
    token: ClusterToken | None = None

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` with these secrets put in (a token of `base` removed when there is none)."""
        env = {**base, REDIS_URL_ENV: self.redis_url}
        env.pop(TOKEN_ENV, None)
        if self.token is not None:
            env[TOKEN_ENV] = self.token.secret
        return env


def worker_template() -> WorkerConfig:
    """Every worker's options but its own (`WORKER_CHILD_FIELDS`, placeholders here)."""
    return WorkerConfig(role=WorkerRole.DECODE, worker_id="template", model_dir=_PLACEHOLDER_MODEL)


def gateway_template() -> GatewayConfig:
    """The gateway's options but its own (`GATEWAY_CHILD_FIELDS`, placeholders here)."""
    return GatewayConfig(model_dir=_PLACEHOLDER_MODEL, redis_url=_PLACEHOLDER_REDIS)


@functools.cache
def _shared_fields() -> tuple[tuple[str, str], ...]:
    """(worker field, gateway field) pairs that one `tandem up` flag sets: the flags that both
    templates have (`--cluster`, `--max-model-len`, `--block-size`, `--model-id`, `--otel-*`).
    The two must agree in a config built in code too."""
    paths_by_flag: dict[str, list[tuple[str, ...]]] = {}
    for option in options(LocalClusterConfig):
        paths_by_flag.setdefault(option.flag, []).append(option.path)
    return tuple(
        (".".join(worker[1:]), ".".join(gateway[1:]))
        for paths in paths_by_flag.values()
        if len(paths) == 2
        for worker, gateway in [sorted(paths, key=lambda path: path[0] != "worker")]
    )


def _get(config: object, dotted: str) -> object:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


@dataclass(frozen=True)
class LocalClusterConfig:
    """One gateway, `num_prefill` prefill and `num_decode` decode workers, and Redis, as local
    processes. `num_prefill=0` is colocated serving: decode workers prefill locally.
    `model_dir=None` serves the generated tiny model; `redis_url=None` starts a private
    redis-server. `worker` and `gateway` are the children's templates: the gateway's
    `host:port` is the public address (port 0: a free one); workers always bind 127.0.0.1 on
    free ports. Times are seconds. `restart` says how a child that dies is restarted
    (`restarts.py`). `autoscale` (None: fixed pools) lets the autoscaler resize
    both pools between its bounds, starting from the given sizes."""

    num_prefill: int = field(
        default=1, metadata={"flag": "prefill", "help": "prefill workers (0: colocated, decode workers prefill)"}
    )
    num_decode: int = field(default=1, metadata={"flag": "decode", "help": "decode workers (>= 1)"})
    model_dir: Path | None = field(
        default=None, metadata={"flag": "model", "help": "local HF model directory (default: tiny model)"}
    )
    redis_url: str | None = field(
        default=None, metadata={"flag": "redis-url", "help": "use this Redis (default: start a private redis-server)"}
    )
    worker: WorkerConfig = field(default_factory=worker_template, metadata={"skip": WORKER_CHILD_FIELDS})
    gateway: GatewayConfig = field(default_factory=gateway_template, metadata={"skip": GATEWAY_CHILD_FIELDS})
    ready_timeout_s: float = field(default=180.0, metadata={"help": "bound on start-up"})
    gateway_stop_timeout_s: float = field(default=10.0, metadata={"help": "bound on the gateway's stop"})
    restart: RestartPolicy = field(default_factory=RestartPolicy, metadata={"prefix": "restart-"})
    autoscale: AutoscalerConfig | None = field(
        default=None,
        metadata={
            "flag": "autoscale",
            "help": "resize the pools on their queue depth between --prefill-min/max and --decode-min/max",
        },
    )

    def __post_init__(self) -> None:
        for name, low in (("num_prefill", 0), ("num_decode", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.num_prefill + self.num_decode > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} workers on one machine, got {self.num_prefill + self.num_decode}")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise ValueError(f"model_dir {self.model_dir} is not a directory")
        if self.redis_url is not None and not self.redis_url.startswith(_REDIS_SCHEMES):
            raise ValueError(f"redis_url must start with one of {_REDIS_SCHEMES}, got {self.redis_url!r}")
        if not isinstance(self.worker, WorkerConfig) or not isinstance(self.gateway, GatewayConfig):
            raise ValueError("worker must be a WorkerConfig and gateway a GatewayConfig")
        if not isinstance(self.restart, RestartPolicy):
            raise ValueError(f"restart must be a RestartPolicy, got {self.restart!r}")
        for worker_field, gateway_field in _shared_fields():
            if _get(self.worker, worker_field) != _get(self.gateway, gateway_field):
                raise ValueError(
                    f"the workers' {worker_field} ({_get(self.worker, worker_field)!r}) must equal the "
                    f"gateway's {gateway_field} ({_get(self.gateway, gateway_field)!r})"
                )
        if any(any(c.isspace() or c == "," for c in key) for key in self.gateway.api_keys):
            raise ValueError("api keys must not contain spaces or commas")
        for name in ("ready_timeout_s", "gateway_stop_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.autoscale is not None:
            self._check_autoscale(self.autoscale)

    def _check_autoscale(self, autoscale: AutoscalerConfig) -> None:
        if not isinstance(autoscale, AutoscalerConfig):
            raise ValueError(f"autoscale must be an AutoscalerConfig, got {autoscale!r}")
        for name, count, pool in (
            ("prefill", self.num_prefill, autoscale.prefill),
            ("decode", self.num_decode, autoscale.decode),
        ):
            if not pool.min_replicas <= count <= pool.max_replicas:
                raise ValueError(
                    f"the {name} pool starts with {count} workers, outside its autoscaling "
                    f"bounds [{pool.min_replicas}, {pool.max_replicas}]"
                )
        if autoscale.prefill.max_replicas + autoscale.decode.max_replicas > MAX_WORKERS:
            raise ValueError(
                f"at most {MAX_WORKERS} workers on one machine; the autoscaling maxima allow "
                f"{autoscale.prefill.max_replicas + autoscale.decode.max_replicas}"
            )

    @property
    def cluster(self) -> str:
        return self.gateway.cluster

    @property
    def drain_timeout_s(self) -> float:
        """Each worker's bound on its drain at stop."""
        return self.worker.drain_timeout_s

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The gateway's API keys, in the order given (the banner's example uses the first)."""
        return self.gateway.api_keys

    @property
    def num_workers(self) -> int:
        return self.num_prefill + self.num_decode

    @property
    def max_workers(self) -> int:
        """The most workers the pools may have: the autoscaling maxima, else the workers started."""
        scale = self.autoscale
        return self.num_workers if scale is None else scale.prefill.max_replicas + scale.decode.max_replicas

    def threads_per_worker(self, cpu_count: int | None) -> int:
        """The host's cores divided among the most workers the pools may have (DESIGN section
        6b), at least 1."""
        return max(1, (cpu_count or 1) // self.max_workers)

    def worker_ids(self) -> list[tuple[WorkerRole, str]]:
        """(role, worker id) of every worker, decode first: `decode-0`, ..., `prefill-0`, ..."""
        return [(WorkerRole.DECODE, f"decode-{i}") for i in range(self.num_decode)] + [
            (WorkerRole.PREFILL, f"prefill-{i}") for i in range(self.num_prefill)
        ]

    def worker_config(
        self,
        role: WorkerRole,
        worker_id: str,
        model_dir: Path,
        redis_url: str,
        num_threads: int,
        host: str = WORKER_HOST,
    ) -> WorkerConfig:
        """One worker's config: the template with its own values, bound to `host` (a Ray
        worker: its node's IP) on free ports."""
        return dataclasses.replace(
            self.worker,
            role=role,
            worker_id=worker_id,
            model_dir=model_dir,
            host=host,
            port=0,
            advertise_host=None,
            metrics_port=0,
            redis_url=redis_url,
            engine=dataclasses.replace(self.worker.engine, num_threads=num_threads),
        )

    def worker_argv(
        self,
        role: WorkerRole,
        worker_id: str,
        model_dir: Path,
        redis_url: str,
        num_threads: int,
        host: str = WORKER_HOST,
    ) -> list[str]:
        """The command line of one worker: `worker_config(...)` as flags, but for its Redis URL
        (`ChildSecrets.environ` gives it)."""
        config = self.worker_config(role, worker_id, model_dir, redis_url, num_threads, host)
        return [sys.executable, "-m", "tandem", role.value, *to_argv(config, skip=_SECRET_FIELDS)]

    def gateway_config(self, model_dir: Path, redis_url: str, port: int | None = None) -> GatewayConfig:
        """The gateway's config: the template with the model and Redis put in, on `port` if
        given (a restarted gateway keeps the port its clients know)."""
        config = dataclasses.replace(self.gateway, model_dir=model_dir, redis_url=redis_url)
        return config if port is None else dataclasses.replace(config, port=port)

    def gateway_argv(self, model_dir: Path, redis_url: str, port: int | None = None) -> list[str]:
        """The command line of the gateway; its API keys travel in `gateway_env`, its Redis URL
        in `ChildSecrets.environ`."""
        config = self.gateway_config(model_dir, redis_url, port)
        skip = _SECRET_FIELDS | {"api_keys"}
        return [sys.executable, "-m", "tandem", "gateway", *to_argv(config, skip=skip)]

    def gateway_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The gateway's environment: `base` plus the API keys in `TANDEM_API_KEYS` (in the
        environment, not on the command line, where every local user could read them)."""
        env = dict(base)
        env.pop(API_KEYS_ENV, None)
        if self.gateway.api_keys:
            env[API_KEYS_ENV] = ",".join(self.api_keys)
        return env
