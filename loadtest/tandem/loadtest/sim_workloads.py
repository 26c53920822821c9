"""The load generator's workloads as simulator input: YAML workload + seed + rate -> `TraceRequest`s.

The requests are the very ones `python -m tandem.loadtest run --workload W --seed S --rate R`
sends: the same workload sampler (`Workload.generate(n, seed)`) and the same open-loop send
times (`OpenLoop.send_times_s(n, seed)`, the seed shared as in `runner.run_load`). Only token
ids are dropped; what the simulator needs of them is kept as prefix groups.

Prefix groups (`TraceRequest.prefix_group`, `prefix_tokens`). Two requests of one group share
their first min(prefix_tokens) tokens, so a simulator that gives block i of group g the same
identity in every request of g reproduces the workload's prefix-cache hits:
- `shared_prefix`: group g is the g-th system prompt, and a prompt's prefix is its
  `shared_prefix_len(shared_fraction, prompt_len)` tokens of it;
- `multi_turn`: group c is conversation c; turn k's prompt starts with every earlier turn's
  prompt, so its prefix is all of its prompt when a later turn of the conversation is in the
  run, else the previous turn's prompt (0, no group, for a lone turn 0);
- `random` and `interference`: no groups (random prompts share a first token only by chance).

Memory: the samplers draw every prompt's token ids; a run of N requests of L tokens holds N x L
Python ints for a moment. Bench-sized runs (thousands of requests) are cheap; a 10-minute run
at 2,000 requests/s is better read from a trace file (`tandem.sim.traces`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tandem.loadtest.arrivals import ArrivalPattern, OpenLoop
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.workloads import (
    MultiTurnWorkload,
    SharedPrefixWorkload,
    Workload,
    load_workload,
    shared_prefix_len,
)
from tandem.sim.types import TraceRequest

Prefixes = list[tuple[int | None, int]]  # per request: (prefix_group, prefix_tokens)


def _no_prefixes(workload: Workload, requests: Sequence[WorkloadRequest]) -> Prefixes:
    return [(None, 0)] * len(requests)


def _system_prompts(workload: Workload, requests: Sequence[WorkloadRequest]) -> Prefixes:
    assert isinstance(workload, SharedPrefixWorkload)
    prefixes: Prefixes = []
    for i, request in enumerate(requests):
        shared = shared_prefix_len(workload.shared_fraction, request.prompt_len)
        prefixes.append((i % workload.num_prefixes, shared) if shared else (None, 0))
    return prefixes


def _conversations(workload: Workload, requests: Sequence[WorkloadRequest]) -> Prefixes:
    last_turn: dict[int, int] = {}
    prompt_len: dict[tuple[int, int], int] = {}
    for request in requests:
        assert request.conversation_id is not None and request.turn is not None
        last_turn[request.conversation_id] = max(last_turn.get(request.conversation_id, 0), request.turn)
        prompt_len[request.conversation_id, request.turn] = request.prompt_len
    prefixes: Prefixes = []
    for request in requests:
        conversation, turn = request.conversation_id, request.turn
        assert conversation is not None and turn is not None
        if turn < last_turn[conversation]:
            prefixes.append((conversation, request.prompt_len))
        elif turn > 0:
            prefixes.append((conversation, prompt_len[conversation, turn - 1]))
        else:
            prefixes.append((None, 0))
    return prefixes


# how each workload kind's prompts share prefixes (by the workload's type: the kinds are classes)
_PREFIXES: Mapping[type, Callable[[Workload, Sequence[WorkloadRequest]], Prefixes]] = {
    SharedPrefixWorkload: _system_prompts,
    MultiTurnWorkload: _conversations,
}


def workload_trace(workload: Workload, num_requests: int, seed: int, load: OpenLoop) -> tuple[TraceRequest, ...]:
    """`num_requests` requests of `workload` for `seed`, arriving as `load` sends them."""
    requests = workload.generate(num_requests, seed)
    arrivals_s = load.send_times_s(len(requests), seed)
    prefixes = _PREFIXES.get(type(workload), _no_prefixes)(workload, requests)
    return tuple(
        TraceRequest(at_s, request.prompt_len, request.max_tokens, group, tokens)
        for request, at_s, (group, tokens) in zip(requests, arrivals_s, prefixes)
    )


def load_workload_trace(
    path: Path,
    num_requests: int,
    seed: int,
    rate_rps: float,
    pattern: ArrivalPattern = ArrivalPattern.POISSON,
) -> tuple[TraceRequest, ...]:
    """`workload_trace` of the workload YAML file at `path`, sent open-loop at `rate_rps`."""
    return workload_trace(load_workload(path), num_requests, seed, OpenLoop(rate_rps, pattern))
