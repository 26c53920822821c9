"""Session affinity decisions as a table: the session's decode worker is kept while it is a
candidate within its load limits; otherwise the prefix-aware policy decides as without one."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from starlette.requests import Request as HTTPRequest

from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.gateway.state import GatewayState
from tandem.scheduler import PrefixAware, RouteKind, RouteRequest, SchedulerConfig, decide
from tandem.scheduler.affinity import Affinity, AffinityPolicy, affine_view, session_hash
from tandem.scheduler.types import WorkerView

CONFIG = SchedulerConfig(local_prefill_max_tokens=256)
POLICY = AffinityPolicy(PrefixAware(), CONFIG.affinity_max_waiting, CONFIG.affinity_max_kv_usage)
NUM_TOKENS = 512  # 32 blocks
NOW = 1000.0


def view(worker_id: str, cached_blocks: int = 0, waiting: int = 0, kv_used: int = 0, role=WorkerRole.DECODE):
    info = WorkerInfo(worker_id, role, f"127.0.0.1:{7000 + len(worker_id)}", "ab12", 100, "t")
    return WorkerView(info, WorkerLoad(waiting, 0, 0, kv_used, 100, NOW), cached_blocks)


def route(session_worker: str | None, decode: list[WorkerView], prefill=(), exclude=frozenset()):
    request = RouteRequest("r", NUM_TOKENS, tuple(range(NUM_TOKENS // 16)), 0, session_worker)
    return decide(request, list(prefill), decode, POLICY, CONFIG, exclude)


IDLE_PAIR = [view("d0"), view("d1")]
PREFIX_ON_D1 = [view("d0"), view("d1", cached_blocks=32)]

TABLE = [
    # (case, session worker, decode views, exclude, decode picked)
    ("no session: prefix-aware picks the cached worker", None, PREFIX_ON_D1, frozenset(), "d1"),
    ("unknown or expired session: the store answered None", None, IDLE_PAIR, frozenset(), "d0"),
    ("known session, its worker idle", "d1", IDLE_PAIR, frozenset(), "d1"),
    ("known session wins over a prefix hit elsewhere", "d0", PREFIX_ON_D1, frozenset(), "d0"),
    (
        "known session, its worker at the waiting limit (2)",
        "d0",
        [view("d0", waiting=2), view("d1", 32)],
        frozenset(),
        "d0",
    ),
    (
        "known session, its worker over the waiting limit: moves",
        "d0",
        [view("d0", waiting=3), view("d1", 32)],
        frozenset(),
        "d1",
    ),
    (
        "known session, its worker's KV over 90%: moves",
        "d0",
        [view("d0", kv_used=91), view("d1", 32)],
        frozenset(),
        "d1",
    ),
    ("its worker is gone (heartbeat expired)", "d9", PREFIX_ON_D1, frozenset(), "d1"),
    ("its worker is draining (deregistered: not a view)", "d0", [view("d1", 32), view("d2")], frozenset(), "d1"),
    ("its worker failed and is excluded on the retry", "d0", PREFIX_ON_D1, frozenset({"d0"}), "d1"),
]


@pytest.mark.parametrize(("case", "session_worker", "decode", "exclude", "picked"), TABLE, ids=[t[0] for t in TABLE])
def test_decode_pick(case: str, session_worker: str | None, decode, exclude, picked: str) -> None:
    decision = route(session_worker, decode, exclude=exclude)
    assert (decision.kind, decision.decode.worker_id) == (RouteKind.LOCAL_PREFILL, picked)


def test_the_prefill_pool_is_left_to_the_policy() -> None:
    prefill = [view("p0", role=WorkerRole.PREFILL), view("p1", 32, role=WorkerRole.PREFILL)]
    decision = route("p0", [view("d0"), view("d1")], prefill)
    assert (decision.kind, decision.decode.worker_id, decision.prefill and decision.prefill.worker_id) == (
        RouteKind.DISAGGREGATED,
        "d0",  # p0 is no decode candidate: the tie goes to the lower id
        "p1",  # the prefix hit, not the session's id
    )


def test_affine_view_says_why() -> None:
    request = RouteRequest("r", 16, (1,), 0, "d0")
    assert affine_view(request, [view("d0")], 2, 0.9) == (view("d0"), Affinity.KEPT)
    assert affine_view(request, [view("d0", waiting=3)], 2, 0.9) == (None, Affinity.OVERLOADED)
    assert affine_view(request, [view("d1")], 2, 0.9) == (None, Affinity.GONE)
    assert affine_view(RouteRequest("r", 16, (1,), 0), [view("d0")], 2, 0.9) == (None, Affinity.NONE)
    no_load = WorkerView(view("d0").info, None, 0)
    assert affine_view(request, [no_load], 0, 0.0) == (no_load, Affinity.KEPT)  # no load yet: idle


def test_session_hash_is_stable_and_hides_the_key() -> None:
    digest = session_hash("conversation-1")
    assert digest == session_hash("conversation-1") != session_hash("conversation-2")
    assert len(digest) == 32 and "conversation" not in digest
    assert digest == hashlib.blake2b(b"conversation-1", digest_size=16, person=b"tandem-session").hexdigest()


def _http(headers: dict[str, str]) -> HTTPRequest:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return HTTPRequest({"type": "http", "method": "POST", "path": "/", "headers": raw})


@pytest.mark.parametrize(
    ("source", "header", "headers", "user", "key"),
    [
        ("header", "x-session-id", {"X-Session-Id": "s1"}, "u1", "s1"),
        ("header", "x-conversation", {"x-conversation": "c7"}, None, "c7"),
        ("header", "x-session-id", {}, "u1", None),
        ("user", "x-session-id", {"x-session-id": "s1"}, "u1", "u1"),
        ("user", "x-session-id", {}, None, None),
        ("user", "x-session-id", {}, "", None),
    ],
)
def test_the_session_key_comes_from_the_configured_place(source, header, headers, user, key) -> None:
    state = SimpleNamespace(
        config=SimpleNamespace(session_key=source, session_header=header),
        pipeline=SimpleNamespace(affinity=object()),
    )
    expected = None if key is None else session_hash(key)
    assert GatewayState.session(state, _http(headers), user) == expected  # type: ignore[arg-type]
    state.pipeline.affinity = None  # no affinity (--session-key none or affinity_ttl_s 0): no key
    assert GatewayState.session(state, _http(headers), user) is None  # type: ignore[arg-type]


def test_affinity_config_is_validated() -> None:
    with pytest.raises(ValueError) as info:
        SchedulerConfig(affinity_max_kv_usage=1.5)
    assert str(info.value) == "scheduler affinity_max_kv_usage must be <= 1, got 1.5"
    with pytest.raises(ValueError) as info:
        SchedulerConfig(affinity_max_waiting=-1)
    assert str(info.value) == "scheduler affinity_max_waiting must be an int >= 0, got -1"
