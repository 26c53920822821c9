"""Constrained sequences whose grammar is still compiling: they wait here, outside the batcher
and holding no blocks, so that no other request waits for a compile.

Owner: the engine, on its step loop. `start` gives a sequence its matcher once its compile is
done (raising the compile's GrammarError, a ValueError); `add` parks one whose compile is not;
`compiled`, at each step, starts the parked sequences whose compile finished and hands them
out: those that started leave at once (the engine queues them in the batcher), those whose
compile failed stay until the engine aborts them (`discard`), as it does any sequence aborted
while it waits.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING

from tandem.engine.grammar.matchers import GrammarMatchers
from tandem.engine.sequence import Sequence

if TYPE_CHECKING:
    from xgrammar import CompiledGrammar


class GrammarWaits:
    def __init__(self, matchers: GrammarMatchers) -> None:
        self.matchers = matchers
        self._waiting: dict[str, tuple[Sequence, Future[CompiledGrammar]]] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def start(self, seq: Sequence, grammar: Future[CompiledGrammar]) -> None:
        """The compile finished: give `seq` its matcher (raises the compile's GrammarError)."""
        self.matchers.start(seq.request_id, grammar.result(), seq.output_token_ids)

    def add(self, seq: Sequence, grammar: Future[CompiledGrammar]) -> None:
        self._waiting[seq.request_id] = (seq, grammar)

    def discard(self, request_id: str) -> bool:
        """Forget a waiting sequence (the engine aborts it); False if it was not waiting."""
        return self._waiting.pop(request_id, None) is not None

    def compiled(self, block_s: float) -> list[tuple[Sequence, str | None]]:
        """Start the waiting sequences whose compile finished, in the order they arrived: each
        with None (started: no longer waiting) or its compile's error message (still waiting,
        until `discard`). Waits up to `block_s` for one to finish."""
        if not self._waiting:
            return []
        if block_s > 0:
            wait([f for _, f in self._waiting.values()], timeout=block_s, return_when=FIRST_COMPLETED)
        done: list[tuple[Sequence, str | None]] = []
        for request_id, (seq, grammar) in list(self._waiting.items()):
            if not grammar.done():
                continue
            try:
                self.start(seq, grammar)
            except ValueError as exc:
                done.append((seq, str(exc)))
                continue
            del self._waiting[request_id]
            done.append((seq, None))
        return done
