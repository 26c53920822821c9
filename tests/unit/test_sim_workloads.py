"""The load generator's YAML workloads as simulator traces: the same requests and send times as
the load generator, with prefix groups that match the prompts' real token ids."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tandem.loadtest.arrivals import ArrivalPattern, OpenLoop
from tandem.loadtest.sim_workloads import load_workload_trace, workload_trace
from tandem.loadtest.workloads import LengthRange, MultiTurnWorkload, SharedPrefixWorkload, load_workload
from tandem.sim.types import TraceRequest

WORKLOADS = Path(__file__).resolve().parents[2] / "loadtest" / "tandem" / "loadtest" / "workloads"


def _check_groups_share_their_prefixes(prompts: list[tuple[int, ...]], trace: tuple[TraceRequest, ...]) -> None:
    for (p, a), (q, b) in itertools.combinations(zip(prompts, trace), 2):
        if a.prefix_group is not None and a.prefix_group == b.prefix_group:
            shared = min(a.prefix_tokens, b.prefix_tokens)
            assert p[:shared] == q[:shared]


def test_random_workload_keeps_lengths_and_send_times() -> None:
    trace = load_workload_trace(WORKLOADS / "random.yaml", 20, seed=3, rate_rps=4.0)
    requests = load_workload(WORKLOADS / "random.yaml").generate(20, 3)
    times = OpenLoop(4.0).send_times_s(20, 3)
    assert trace == tuple(TraceRequest(t, r.prompt_len, r.max_tokens) for r, t in zip(requests, times))


def test_shared_prefix_groups_are_the_system_prompts() -> None:
    trace = load_workload_trace(
        WORKLOADS / "shared_prefix.yaml", 10, seed=0, rate_rps=2.0, pattern=ArrivalPattern.CONSTANT
    )
    assert [r.arrival_s for r in trace] == [i / 2.0 for i in range(10)]
    assert [(r.prefix_group, r.prefix_tokens) for r in trace] == [(i % 4, 192) for i in range(10)]  # 0.75 x 256
    prompts = [r.prompt_token_ids for r in load_workload(WORKLOADS / "shared_prefix.yaml").generate(10, 0)]
    _check_groups_share_their_prefixes(prompts, trace)
    # each prompt holds exactly its 192 tokens of its group's system prompt, not one more
    systems = SharedPrefixWorkload(LengthRange(256, 256), LengthRange(32, 32), 0.75, 4).system_prompts(0)
    assert all(p[:192] == systems[i % 4][:192] and p[192] != systems[i % 4][192] for i, p in enumerate(prompts))


def test_shared_prefix_with_varied_lengths() -> None:
    workload = SharedPrefixWorkload(LengthRange(10, 40), LengthRange(1, 2), shared_fraction=0.5, num_prefixes=2)
    trace = workload_trace(workload, 12, 5, OpenLoop(1.0))
    requests = workload.generate(12, 5)
    assert [r.prefix_tokens for r in trace] == [(r.prompt_len + 1) // 2 for r in requests]  # half, rounded up
    _check_groups_share_their_prefixes([r.prompt_token_ids for r in requests], trace)


def test_multi_turn_groups_are_conversations() -> None:
    trace = load_workload_trace(WORKLOADS / "multi_turn.yaml", 6, seed=1, rate_rps=1.0)
    # 2 conversations of 4 turns, cut at 6 requests: turns 0, 1 of both, then turns 2 of both;
    # prompts are 64, 128, 192 tokens; the last turn in the run shares the previous turn's prompt
    assert [(r.prompt_tokens, r.prefix_group, r.prefix_tokens) for r in trace] == [
        (64, 0, 64),
        (64, 1, 64),
        (128, 0, 128),
        (128, 1, 128),
        (192, 0, 128),
        (192, 1, 128),
    ]
    prompts = [r.prompt_token_ids for r in load_workload(WORKLOADS / "multi_turn.yaml").generate(6, 1)]
    _check_groups_share_their_prefixes(prompts, trace)


def test_a_lone_first_turn_has_no_group() -> None:
    workload = MultiTurnWorkload(LengthRange(8, 8), LengthRange(4, 4), LengthRange(2, 2), num_turns=3)
    assert [(r.prefix_group, r.prefix_tokens) for r in workload_trace(workload, 1, 0, OpenLoop(1.0))] == [(None, 0)]


def test_interference_has_no_groups_and_is_deterministic() -> None:
    first = load_workload_trace(WORKLOADS / "interference.yaml", 8, seed=7, rate_rps=3.0)
    assert first == load_workload_trace(WORKLOADS / "interference.yaml", 8, seed=7, rate_rps=3.0)
    assert first != load_workload_trace(WORKLOADS / "interference.yaml", 8, seed=8, rate_rps=3.0)
    assert all(r.prefix_group is None and r.prefix_tokens == 0 for r in first)
    with pytest.raises(ValueError, match="positive number of requests per second"):
        load_workload_trace(WORKLOADS / "interference.yaml", 8, seed=7, rate_rps=0.0)
