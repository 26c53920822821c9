"""Overload control in the engine: the bound on waiting sequences, and shedding by priority.

Who calls it: `Engine.add_request` and `Engine.reserve`, on the step loop, after the new
request was validated and before it is queued, when the caller (a worker) passes its bound
`max_waiting`. What counts as waiting: every live sequence that is not running (queued to
prefill, reserved while its KV is pulled, or pulled and `ready`). The offline API has no bound.

The rule (DESIGN.md section 6b, "a full inbox is an immediate, explicit busy"):
1. Below the bound, the request is queued.
2. At the bound, a request sheds the least important queued sequences that may be shed
   (`Batcher.shed_candidates`: largest priority, then latest arrival) if they are strictly
   less important than it (a larger `priority` value); each shed sequence is aborted with
   `shed_message`, which its client gets as the error.
3. Otherwise the request is refused with `WaitingQueueFullError` (the worker answers busy:
   RESOURCE_EXHAUSTED), and nothing is shed.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tandem.engine.sequence import Sequence


class WaitingQueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound and nothing less important can be shed."""


def sequences_to_shed(priority: int, num_waiting: int, max_waiting: int, candidates: Seq[Sequence]) -> list[Sequence]:
    """The queued sequences to shed so that one more request of `priority` fits within
    `max_waiting` ([] if it fits already). `candidates` are in shedding order. Raises
    `WaitingQueueFullError` when too few of them are less important than `priority`."""
    need = num_waiting - max_waiting + 1
    if need <= 0:
        return []
    victims = [s for s in candidates if s.priority > priority][:need]
    if len(victims) < need:
        full = f"waiting queue is full ({num_waiting} waiting, max_waiting {max_waiting})"
        if need == 1:
            raise WaitingQueueFullError(f"{full} and no queued request is less important than priority {priority}")
        raise WaitingQueueFullError(
            f"{full} and only {len(victims)} queued requests are less important than priority {priority} "
            f"({need} needed)"
        )
    return victims


def shed_message(shed_priority: int, priority: int) -> str:
    """What the client of a shed request is told."""
    return f"shed: priority {shed_priority} request displaced by priority {priority} under overload"
