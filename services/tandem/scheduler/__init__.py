"""The cluster-level scheduler: picks the (prefill, decode) pair for each request.

Used as a library inside the gateway (DESIGN.md sections 2 and 5). `Scheduler` keeps a
Redis-fed view of the workers and a prefix index; `picker.decide` is the pure decision it
runs; `policies` holds the routing policies, chosen by name in `SchedulerConfig.policy`.
"""

from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.index import PrefixIndex
from tandem.scheduler.picker import decide
from tandem.scheduler.policies import (
    POLICIES,
    LeastLoaded,
    Policy,
    PolicyConfig,
    PrefixAware,
    RoundRobin,
    make_policy,
    prefix_aware_cost,
)
from tandem.scheduler.registry import HashScheme, RegistrySnapshot
from tandem.scheduler.routing import route_on
from tandem.scheduler.scheduler import Scheduler
from tandem.scheduler.types import (
    NoWorkerError,
    RouteDecision,
    RouteKind,
    RouteRequest,
    WorkerStatus,
    WorkerView,
)

__all__ = [
    "POLICIES",
    "HashScheme",
    "LeastLoaded",
    "NoWorkerError",
    "Policy",
    "PolicyConfig",
    "PrefixAware",
    "PrefixIndex",
    "RegistrySnapshot",
    "RoundRobin",
    "RouteDecision",
    "RouteKind",
    "RouteRequest",
    "Scheduler",
    "SchedulerConfig",
    "WorkerStatus",
    "WorkerView",
    "decide",
    "make_policy",
    "prefix_aware_cost",
    "route_on",
]
