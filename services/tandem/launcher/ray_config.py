"""How `tandem up --ray` reaches Ray: the cluster to join (or a private head), its auth, and what
each worker actor asks for. No `ray` import here: the CLI reads it when it builds its parser."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tandem.launcher.ray_auth import RayAuth

_ADDRESS_RE = re.compile(r"^(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}$")


@dataclass(frozen=True)
class RayConfig:
    """`address`: the Ray cluster to join (`host:port` of its GCS, or `ray://host:port`);
    None starts a private head. `cpus_per_worker`: each worker actor's CPU request when the
    cluster has no GPU (a GPU cluster gives each worker one GPU). `head_start_timeout_s`
    bounds the private head's start."""

    address: str | None = field(
        default=None, metadata={"no_flag": "`tandem up --ray [ADDRESS]`, a flag with an optional value"}
    )
    auth: RayAuth = field(
        default_factory=RayAuth, metadata={"no_flag": "--ray-auth-token-file and Ray's own environment variables"}
    )
    cpus_per_worker: float = field(
        default=1.0,
        metadata={
            "flag": "ray-cpus-per-worker",
            "help": "CPUs each worker actor asks Ray for (a cluster with GPUs gives each worker one GPU)",
        },
    )
    head_start_timeout_s: float = field(
        default=60.0, metadata={"flag": "ray-head-start-timeout-s", "help": "bound on a private Ray head's start"}
    )

    def __post_init__(self) -> None:
        if self.address is not None and not _ADDRESS_RE.match(self.address):
            raise ValueError(f"the Ray address must be host:port or ray://host:port, got {self.address!r}")
        if not isinstance(self.auth, RayAuth):
            raise ValueError("auth must be a RayAuth")
        for name in ("cpus_per_worker", "head_start_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")

    @property
    def own_head(self) -> bool:
        return self.address is None
