"""The scheduler's messages: what the gateway asks, what the picker sees, what it answers.

Who builds what:
- The gateway builds a `RouteRequest` per request (block hashes from
  `tandem.common.block_hash.hash_blocks`, with the workers' block_size and extra) and takes
  its `seq` from `Scheduler.next_seq()`.
- The `Scheduler` builds one `WorkerView` per live worker at decision time, from its registry
  snapshot and its prefix index.
- `picker.decide` returns a `RouteDecision`; the gateway applies it (calls P, then D).
All of them are frozen: nobody mutates a decision's inputs or outputs after construction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tandem.common.workers import WorkerInfo, WorkerLoad


class NoWorkerError(RuntimeError):
    """No routable decode worker (none live, or all excluded). The gateway answers 503."""


class RouteKind(str, enum.Enum):
    DISAGGREGATED = "disaggregated"  # P prefills, D pulls the KV and decodes
    LOCAL_PREFILL = "local_prefill"  # D prefills the prompt itself, then decodes


@dataclass(frozen=True)
class RouteRequest:
    """One request as the scheduler sees it.

    `block_hashes` are the chained hashes of the prompt's FULL blocks, in order, so
    `len(block_hashes) == num_prompt_tokens // block_size` (checked by `picker.decide`).
    `seq` is the scheduler's request counter (`Scheduler.next_seq()`), which makes round robin
    a pure function of the request. `session_worker` is the decode worker that served the
    request's session last (affinity.py), None without a session or an affinity.
    """

    request_id: str
    num_prompt_tokens: int
    block_hashes: tuple[int, ...]
    seq: int
    session_worker: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        for name in ("num_prompt_tokens", "seq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        # Per-hash checks would cost O(num_blocks) on the routing path; the gateway builds
        # the tuple with hash_blocks, which only yields unsigned 64-bit ints.
        if not isinstance(self.block_hashes, tuple):
            raise ValueError("block_hashes must be a tuple of ints (use tuple(hash_blocks(...)))")


@dataclass(frozen=True, slots=True)  # slots: built once per live worker on every route call
class WorkerView:
    """One live worker at decision time.

    `load` is None while the worker has not published a load yet (policies treat it as idle).
    `num_cached_blocks` is the number of the prompt's LEADING blocks this worker holds
    according to the prefix index (confirmed by KV events, or claimed speculatively).
    """

    info: WorkerInfo
    load: WorkerLoad | None
    num_cached_blocks: int


@dataclass(frozen=True)
class WorkerStatus:
    """One live worker for `tandem status`: its registration, its last load, the block hashes
    its KV events put in the scheduler's prefix index, and its live speculative claims (prompts
    routed to it in the last `speculative_ttl_s`)."""

    info: WorkerInfo
    load: WorkerLoad | None
    num_indexed_blocks: int
    num_speculative_claims: int


@dataclass(frozen=True)
class RouteDecision:
    """The picker's answer. `prefill` is None exactly when `kind` is LOCAL_PREFILL.

    `decode_cached_tokens` / `prefill_cached_tokens`: prompt tokens the index says D / P
    already hold as leading full blocks (`prefill_cached_tokens` is 0 without a P).
    """

    kind: RouteKind
    decode: WorkerInfo
    prefill: WorkerInfo | None
    decode_cached_tokens: int
    prefill_cached_tokens: int

    def __post_init__(self) -> None:
        if (self.kind is RouteKind.LOCAL_PREFILL) != (self.prefill is None):
            raise ValueError("a local_prefill decision has no prefill worker; a disaggregated one has exactly one")
