"""The actuator interface: how the autoscaler's decisions reach a deployment target.

The autoscaler loop (one thread) is the only caller. The policy decides a replica count per
pool; an actuator applies it. Implementations, registered by name in `ACTUATORS`-style
factories of their own modules:

- `kubernetes` (`services/tandem/autoscaler/kubernetes.py`): patches the `scale` subresource of the
  prefill and decode Deployments. Kubernetes picks the pod to remove; the pod's `preStop`
  hook (`tandem drain`) drains it before SIGTERM.
- `local` (`services/tandem/autoscaler/local.py`): starts and stops worker processes of a running
  `tandem up` (`services/tandem/launcher/local.py`).
- `ray` (`services/tandem/autoscaler/ray.py`): creates and removes worker actors of `tandem up --ray`.

Contract for every implementation:
- `replicas(role)` counts the workers of the pool that are capacity now or soon: running or
  starting. Workers that are draining or exiting are not counted.
- `scale(role, replicas)` returns promptly (it never waits for a worker to become ready or to
  exit). Scaling up starts new workers. Scaling down chooses the workers to go and starts
  their drain: each one stops taking new work, finishes its sequences, releases its leases,
  and only then exits. Bad input (`replicas < 0`) raises ValueError.
- `close()` releases the actuator's own resources (clients, watcher threads); it does not stop
  the workers.
"""

from __future__ import annotations

from typing import Protocol

from tandem.common.workers import WorkerRole


class Actuator(Protocol):
    name: str

    def replicas(self, role: WorkerRole) -> int:
        """Workers of `role` that count as capacity: running or starting, not draining."""
        ...

    def scale(self, role: WorkerRole, replicas: int) -> None:
        """Bring the pool of `role` to `replicas` workers (drain-aware when shrinking)."""
        ...

    def close(self) -> None:
        """Release the actuator's own resources."""
        ...
