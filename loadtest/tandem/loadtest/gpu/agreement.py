"""Do the tokens a cluster streamed agree with the in-process engine's? (the cluster step's check)

Per request, compared token by token (pure; the criterion and why it has a tolerance at all is
in `step_cluster`'s docstring):
- IDENTICAL: the same ids, the same number of them;
- NEAR_TIE: the same ids up to a first differing position where the engine was at a near tie:
  the streamed token is among the engine's top `TOP_LOGPROBS` there and its logprob is less
  than `near_tie_nats` below the engine's token's. The rest is not compared (the two continue
  from different contexts). With `near_tie_nats=0` nothing is a near tie;
- MISMATCH: anything else, a different length included.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from tandem.engine.outputs import GenerationOutput

TOP_LOGPROBS = 5  # alternatives the engine reports per position


class Kind(str, enum.Enum):
    IDENTICAL = "identical"
    NEAR_TIE = "diverged at a near tie"
    MISMATCH = "mismatched"


@dataclass(frozen=True)
class Verdict:
    """One request's agreement. `num_equal`: leading tokens that are equal; `detail` says where
    and how the two differ ("" when identical)."""

    index: int
    kind: Kind
    num_equal: int
    detail: str = ""


def verdict(index: int, streamed: Sequence[int], expected: GenerationOutput, near_tie_nats: float) -> Verdict:
    """The agreement of request `index`: `streamed` ids against the engine's `expected` output
    (generated with logprobs of the top `TOP_LOGPROBS`)."""
    ids = list(expected.token_ids)
    position = next((i for i, (a, b) in enumerate(zip(streamed, ids)) if a != b), None)
    if position is None:
        if len(streamed) == len(ids):
            return Verdict(index, Kind.IDENTICAL, len(ids))
        detail = f"request {index}: the cluster streamed {len(streamed)} tokens, the engine generated {len(ids)}"
        return Verdict(index, Kind.MISMATCH, min(len(streamed), len(ids)), detail)
    got, want = streamed[position], ids[position]
    logprobs = expected.logprobs[position] if expected.logprobs is not None else None
    top = dict(logprobs.top) if logprobs is not None else {}
    detail = (
        f"request {index} ({len(expected.prompt_token_ids)} prompt tokens) first differs at output "
        f"position {position}: cluster {got}, engine {want}; the engine's top logprobs there: "
        + (", ".join(f"{token} {value:.4f}" for token, value in top.items()) or "none")
    )
    if logprobs is not None and got in top and logprobs.logprob - top[got] < near_tie_nats:
        return Verdict(index, Kind.NEAR_TIE, position, detail)
    return Verdict(index, Kind.MISMATCH, position, detail)


def compare(
    streamed: Sequence[Sequence[int]], expected: Sequence[GenerationOutput], near_tie_nats: float
) -> list[Verdict]:
    """One verdict per request, in order; `streamed` and `expected` are in the same order."""
    if len(streamed) != len(expected):
        raise ValueError(f"{len(streamed)} streams to compare with {len(expected)} engine outputs")
    return [verdict(i, ids, out, near_tie_nats) for i, (ids, out) in enumerate(zip(streamed, expected))]
