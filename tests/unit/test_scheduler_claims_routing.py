"""Speculative claims through `route_on` (exact decisions): a prompt routed to a worker draws
the next prompts that share its prefix there before any KV event, and stops drawing them once
the worker's events say the blocks were stored and then evicted."""

from __future__ import annotations

import pytest

from tandem.common.workers import KVEventKind, KVEventRecord, WorkerInfo, WorkerRole
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.index import PrefixIndex
from tandem.scheduler.policies import make_policy
from tandem.scheduler.registry import RegistrySnapshot
from tandem.scheduler.routing import route_on
from tandem.scheduler.types import RouteRequest

A = tuple(range(1, 37))  # 36 blocks of 16 tokens: a 512-token group prefix (32 blocks) + 4
B = (*A[:32], 101, 102, 103, 104)  # the same group prefix, another question
C = (*A[:20], *range(201, 217))  # shares 20 blocks with A
D = tuple(range(301, 337))  # shares nothing
STORED, REMOVED = KVEventKind.STORED, KVEventKind.REMOVED


def _second(events: list[tuple[KVEventKind, tuple[int, ...]]], prompt: tuple[int, ...]) -> tuple[str, int]:
    """Three idle workers (no load published). A is routed first (seq 0: an exact tie, so
    w-0); then w-0 publishes `events`; then `prompt` is routed (seq 1: an exact tie would
    go to w-1). Returns (worker, its cached tokens)."""
    infos = [WorkerInfo(f"w-{i}", WorkerRole.DECODE, f"10.0.0.{i}:7000", "ff", 1024, "m") for i in range(3)]
    snapshot = RegistrySnapshot.of(infos, {}, 0.0)
    index = PrefixIndex(speculative_ttl_s=10.0)
    config = SchedulerConfig(local_prefill_max_tokens=0)
    policy = make_policy("prefix_aware")
    first = route_on(snapshot, index, RouteRequest("a", 576, A, 0), policy, config, 0.0)
    assert (first.decode.worker_id, first.decode_cached_tokens) == ("w-0", 0)
    for seq, (kind, hashes) in enumerate(events, start=1):
        index.apply(KVEventRecord("w-0", 1, seq, kind, hashes))
    second = route_on(snapshot, index, RouteRequest("b", 576, prompt, 1), policy, config, 1.0)
    return second.decode.worker_id, second.decode_cached_tokens


@pytest.mark.parametrize(
    ("events", "prompt", "expected"),
    [
        # before any event: the claim on A's chain and on its anchors of 1, 2, 4, ..., 32 blocks
        ([], A, ("w-0", 576)),
        ([], B, ("w-0", 512)),  # the anchor of 32 blocks (a claim of A's chain alone: w-1, 0)
        ([], C, ("w-0", 256)),  # shares 20 blocks: the anchor of 16
        ([], D, ("w-1", 0)),  # nothing shared: the tie rotates by seq
        # stored: the confirmed entries replace the claims
        ([(STORED, A)], B, ("w-0", 512)),
        ([(STORED, A)], C, ("w-0", 320)),
        # stored, then evicted: nothing draws A back to w-0 (a claim that outlived the
        # eviction drew it there, cached 576, until its TTL)
        ([(STORED, A), (REMOVED, A)], A, ("w-1", 0)),
        ([(STORED, A), (REMOVED, A[20:])], B, ("w-0", 320)),
        # evicted while the claims of the chains not stored yet still live: A[:16] stored
        ([(STORED, A[:16]), (REMOVED, A[:16])], B, ("w-0", 512)),
    ],
)
def test_claims_draw_a_groups_next_prompts_until_the_events_tell(events, prompt, expected) -> None:
    assert _second(events, prompt) == expected
