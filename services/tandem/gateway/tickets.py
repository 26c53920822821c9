"""The scheduler's in-flight table, as one choice's routes fill it (scheduler/inflight.py).

Every `Scheduler.route` records a prefill and a decode stage of work on the chosen workers;
`RouteTickets` makes sure the pipeline releases each exactly once, whatever way the choice
ends (finished, retried elsewhere, migrated, failed or cancelled).
"""

from __future__ import annotations

from tandem.scheduler import RouteDecision, Scheduler


class RouteTickets:
    """The in-flight work one choice's routing decisions put in the scheduler's table. Each
    decision's prefill and decode stages are released exactly once: when the stage ends, when
    the decision is abandoned for a retry, or at the latest when the choice ends (`close`).
    `block_hashes` (the prompt's, hashed once per choice) serve every route of the choice, and
    so do `session` (the hash of its session key) and `session_worker` (the decode worker
    that served the session last, read once per route of the choice; scheduler/affinity.py)."""

    def __init__(
        self,
        scheduler: Scheduler,
        num_prompt_tokens: int,
        block_hashes: tuple[int, ...],
        session: str | None = None,
        session_worker: str | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._num_prompt_tokens = num_prompt_tokens
        self.block_hashes = block_hashes
        self.session = session
        self.session_worker = session_worker
        self._prefill: list[RouteDecision] = []
        self._decode: list[RouteDecision] = []

    def add(self, decision: RouteDecision) -> None:
        self._prefill.append(decision)
        self._decode.append(decision)

    def prefill_done(self) -> None:
        while self._prefill:
            self._scheduler.prefill_done(self._prefill.pop(), self._num_prompt_tokens)

    def abandon(self, decision: RouteDecision) -> None:
        if decision in self._prefill:
            self._prefill.remove(decision)
            self._scheduler.prefill_done(decision, self._num_prompt_tokens)
        if decision in self._decode:
            self._decode.remove(decision)
            self._scheduler.decode_done(decision)

    def close(self) -> None:
        self.prefill_done()
        while self._decode:
            self._scheduler.decode_done(self._decode.pop())
