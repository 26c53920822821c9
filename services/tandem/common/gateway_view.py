"""What each gateway's router tells the cluster: its routing mode and the workers it refuses.

A gateway's scheduler publishes its `GatewayView` on every registry refresh, under
`tandem:{cluster}:gateway:{gateway_id}` with a TTL of a few refreshes (`cluster_state`), so
that `tandem status` can show the routing mode and why a worker is incompatible without
knowing the gateway's configuration. Redis fields: `routing_mode`, and one
`refused:{worker_id}` field per refused worker whose value is the reason. A malformed entry
is skipped with a warning by the reader. This module imports nothing else from the project
but the leaf `workers`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from tandem.common.workers import check_name

logger = logging.getLogger(__name__)

MAX_REASON_CHARS = 1024
_REFUSED = "refused:"


class RoutingMode(str, enum.Enum):
    """How well a gateway's prefix index knows the workers' caches.

    - `exact`: the index has entries, and every worker's KV events arrived without a gap.
    - `degraded`: some worker's KV events show a sequence gap (trimmed stream, lost write):
      its entries may be stale or missing until it restarts or republishes its block set.
    - `load_only`: the index is empty; routing uses load alone (no prefix can match).
    """

    EXACT = "exact"
    DEGRADED = "degraded"
    LOAD_ONLY = "load_only"


@dataclass(frozen=True)
class GatewayView:
    """One gateway's routing mode and refused workers (`refused`: (worker id, reason) pairs,
    sorted by worker id)."""

    gateway_id: str
    routing_mode: RoutingMode
    refused: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_name("gateway_id", self.gateway_id)
        if not isinstance(self.routing_mode, RoutingMode):
            raise ValueError(f"routing_mode must be a RoutingMode, got {self.routing_mode!r}")
        for worker_id, reason in self.refused:
            check_name("refused worker id", worker_id)
            if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON_CHARS:
                raise ValueError(f"a refusal reason must be 1-{MAX_REASON_CHARS} characters, got {reason!r}")
        if list(self.refused) != sorted(dict(self.refused).items()):
            raise ValueError("refused must be sorted by worker id, one entry per worker")

    @classmethod
    def of(cls, gateway_id: str, routing_mode: RoutingMode, refused: Mapping[str, str]) -> GatewayView:
        """Reasons longer than `MAX_REASON_CHARS` are cut to it."""
        return cls(gateway_id, routing_mode, tuple(sorted((w, why[:MAX_REASON_CHARS]) for w, why in refused.items())))

    def to_fields(self) -> dict[str, str]:
        """The Redis hash fields (see module docstring)."""
        return {"routing_mode": self.routing_mode.value, **{_REFUSED + w: why for w, why in self.refused}}

    @classmethod
    def from_fields(cls, gateway_id: str, fields: Mapping[bytes, bytes]) -> GatewayView | None:
        """The view read from Redis; None (with a warning) if absent or malformed."""
        if not fields:
            return None  # expired between SCAN and HGETALL
        try:
            text = {name.decode("utf-8"): value.decode("utf-8") for name, value in fields.items()}
            mode = text.pop("routing_mode", None)
            if mode is None:
                raise ValueError("missing field 'routing_mode'")
            refused = {}
            for name, reason in text.items():
                if name.startswith(_REFUSED):  # other fields: a newer gateway's, ignored
                    refused[name[len(_REFUSED) :]] = reason
            return cls.of(gateway_id, RoutingMode(mode), refused)
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            logger.warning("skipping malformed gateway view %r: %s", gateway_id, exc)
            return None
