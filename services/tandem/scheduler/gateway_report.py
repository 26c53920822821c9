"""What a gateway's scheduler reports about its routing: the mode, logged when it changes, and
its `GatewayView` (mode and refused workers) published in Redis for `tandem status`.

Used by the registry refresher thread only (`Scheduler.refresh_now`). The routing mode itself
is the prefix index's (`PrefixIndex.mode`); the gauge `tandem_routing_mode` reads it at each
scrape, and the view carries the value of the last refresh.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping

from tandem.common.cluster_state import DEFAULT_TTL_S, ClusterState
from tandem.common.gateway_view import GatewayView, RoutingMode

logger = logging.getLogger(__name__)

VIEWS_PER_TTL = 3  # an unchanged view is rewritten this many times per TTL


def default_gateway_id() -> str:
    """`{hostname}-{pid}`, with the characters a key name may not hold replaced by `-`."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:100] or "gateway"
    return f"{host}-{os.getpid()}"


class GatewayReport:
    """Logs each routing mode change once, and publishes the view under `gateway_id` (None:
    publish nothing, as for a scheduler without a gateway) when it changed, or at least
    `VIEWS_PER_TTL` times per `ttl_s` so that it never expires while the gateway lives.
    `ttl_s` defaults to the larger of `DEFAULT_TTL_S` and 4 refresh intervals."""

    def __init__(
        self, gateway_id: str | None, refresh_interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.gateway_id = gateway_id
        self.ttl_s = max(DEFAULT_TTL_S, 4 * refresh_interval_s)
        self._clock = clock
        self._mode: RoutingMode | None = None
        self._published: GatewayView | None = None
        self._published_at_s = 0.0

    @property
    def mode(self) -> RoutingMode | None:
        """The mode of the last `update` (None before the first)."""
        return self._mode

    def update(
        self, state: ClusterState, mode: RoutingMode, refused: Mapping[str, str], gapped: tuple[str, ...]
    ) -> None:
        """Record the mode and refusals of one refresh; Redis errors propagate (the view is
        then written again on the next call)."""
        if mode is not self._mode:
            why = f" (seq gap in the KV events of {', '.join(gapped)})" if mode is RoutingMode.DEGRADED else ""
            level = logging.WARNING if mode is RoutingMode.DEGRADED else logging.INFO
            logger.log(level, "routing mode: %s%s", mode.value, why)
            self._mode = mode
        if self.gateway_id is None:
            return
        view = GatewayView.of(self.gateway_id, mode, refused)
        now_s = self._clock()
        if view != self._published or now_s - self._published_at_s >= self.ttl_s / VIEWS_PER_TTL:
            state.publish_gateway_view(view, self.ttl_s)
            self._published, self._published_at_s = view, now_s
