"""What the step model plans with: a request's state on a worker as counters (`SimSeq`), one
sequence's share of a step (`Chunk`) and a planned step (`Plan`), with the step's shape for the
cost model. Owner of a `SimSeq`: the `StepModel` of the worker that holds it (stepmodel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.sim.types import StepShape


class SimSeq:
    """One request's state on one worker, as counters (`engine.sequence.Sequence` without tokens).

    `num_tokens` is prompt plus generated; `num_computed` the tokens whose KV is cached here;
    `num_blocks` the blocks it holds itself and `num_hit_blocks` those it shares from the
    worker's prefix cache. `hand_off`: a prefill worker's sequence, done after its first token."""

    __slots__ = (
        "arrival",
        "group",
        "hand_off",
        "max_tokens",
        "num_blocks",
        "num_computed",
        "num_hit_blocks",
        "num_preemptions",
        "num_prompt",
        "num_tokens",
        "prefix_tokens",
        "rid",
    )

    def __init__(
        self, rid: int, num_prompt: int, max_tokens: int, hand_off: bool, group: int | None, prefix_tokens: int
    ) -> None:
        self.rid = rid
        self.num_prompt = num_prompt
        self.num_tokens = num_prompt
        self.max_tokens = max_tokens  # total prompt + output tokens at which the sequence stops
        self.num_computed = 0
        self.num_blocks = 0
        self.num_hit_blocks = 0
        self.arrival = 0
        self.num_preemptions = 0
        self.hand_off = hand_off
        self.group = group
        self.prefix_tokens = prefix_tokens

    @property
    def num_new(self) -> int:
        return self.num_tokens - self.num_computed


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: SimSeq
    num_tokens: int  # computed this step, from seq.num_computed

    @property
    def samples(self) -> bool:
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True, slots=True)
class Plan:
    chunks: tuple[Chunk, ...]
    preempted: tuple[SimSeq, ...]
    admitted: int  # sequences moved into the batch this step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def shape(self) -> StepShape:
        """The step's shape for the cost model."""
        prefill = context = decode_seqs = decode_context = 0
        for c in self.chunks:
            start = c.seq.num_computed
            if c.num_tokens == 1 and start >= c.seq.num_prompt:
                decode_seqs += 1
                decode_context += start + 1
            else:
                prefill += c.num_tokens
                # token i of the chunk attends to start + i + 1 positions
                context += c.num_tokens * start + c.num_tokens * (c.num_tokens + 1) // 2
        return StepShape(prefill, context, decode_seqs, decode_context)
