"""Overload and abort at real workers over gRPC: the bounded waiting queue answers busy
(RESOURCE_EXHAUSTED) and the worker keeps serving; a more important request sheds the least
important queued one, whose stream ends with the shed error; an `Abort` ends a stream or a
prefill call at once. Each worker runs one sequence at a time (`--max-num-seqs 1`), so what
waits and what runs is exact. Every call here is made as the requests' owner (`OWNER`), as the
gateway makes them; handles that will not be decoded are released with their lease secret."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tandem.common import codec
from tandem.common.ownership import new_owner_secret, owner_metadata
from tandem.common.pb import tandem_pb2 as pb
from tandem.engine import Engine, SamplingParams
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.integration.workers import (
    STOP_TIMEOUT_S,
    abort,
    prefill,
    release_kv,
    start_worker,
    wait_until,
    worker_health,
    worker_metric,
    worker_stub,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)  # seconds of decoding
ONE_SEQ = ("--max-num-seqs", "1", "--max-waiting", "2")
ABORT_BOUND_S = 5.0  # far under the gateway's 60 s idle timeout; generous for a loaded machine
OWNER = new_owner_secret()  # this test process submits every request as their owner


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=128)


def _request(request_id: str, prompt: list[int], params: SamplingParams, priority: int = 0) -> pb.Request:
    return codec.request_to_proto(codec.Request(request_id, tuple(prompt), params, None, priority))


def _decode(
    worker: ChildProcess,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    priority: int = 0,
    first: pb.PrefillResponse | None = None,
) -> Iterator[pb.DecodeDelta]:
    msg = pb.DecodeRequest(request=_request(request_id, prompt, params, priority))
    if first is not None:
        msg.first_token = first.first_token
        msg.handle.CopyFrom(first.handle)
    return worker_stub(worker).Decode(msg, timeout=60, metadata=(owner_metadata(OWNER),))


def _abort(worker: ChildProcess, request_id: str) -> bool:
    return abort(worker, request_id, OWNER)


def _abort_refused(worker: ChildProcess, request_id: str) -> bool:
    """Whether an Abort of `request_id` by its owner gets NOT_FOUND (it is not live there)."""
    try:
        _abort(worker, request_id)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    return False


def _prefill_future(worker: ChildProcess, request_id: str, prompt: list[int]) -> grpc.Future:
    request = pb.PrefillRequest(request=_request(request_id, prompt, GREEDY))
    return worker_stub(worker).Prefill.future(request, timeout=60, metadata=(owner_metadata(OWNER),))


def _load(worker: ChildProcess) -> tuple[int, int]:
    h = worker_health(worker)
    return h.waiting, h.running


def _idle(*workers: ChildProcess) -> bool:
    for w in workers:
        h = worker_health(w)
        if h.free_blocks != h.total_blocks or h.held_leases or h.waiting or h.running:
            return False
    return True


def _tokens(deltas: list[pb.DecodeDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path):
    p = start_worker("prefill", tiny_model_dir, *ONE_SEQ, "--max-num-batched-tokens", "1", worker_id="p-busy")
    d = start_worker("decode", tiny_model_dir, *ONE_SEQ, worker_id="d-busy")
    yield p, d
    assert d.stop(STOP_TIMEOUT_S) == 0
    assert p.stop(STOP_TIMEOUT_S) == 0


def test_full_decode_worker_answers_busy_and_keeps_serving(pair, reference: Engine) -> None:
    p, d = pair
    run, w1, w2, x, y = random_prompts([10, 20, 21, 22, 23], reference.model_config.vocab_size, seed=41)
    running = _decode(d, "run", run, LONG)
    next(running)
    queued = [_decode(d, "w1", w1, GREEDY), _decode(d, "w2", w2, GREEDY)]
    assert wait_until(lambda: _load(d) == (2, 1), 10.0)
    busy = "worker d-busy is busy: waiting queue is full (2 waiting, max_waiting 2) and no queued request"
    with pytest.raises(grpc.RpcError) as err:
        list(_decode(d, "x", x, GREEDY))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == f"{busy} is less important than priority 0"
    # with a KV handle: refused before anything is reserved or pulled
    first = prefill(p, "y", y, GREEDY, owner=OWNER)
    pulled_before = worker_metric(d, "tandem_kv_transfer_blocks_total")
    with pytest.raises(grpc.RpcError) as err:
        list(_decode(d, "y", y, GREEDY, priority=3, first=first))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == f"{busy} is less important than priority 3"
    assert worker_metric(d, "tandem_kv_transfer_blocks_total") == pulled_before
    assert _load(d) == (2, 1)
    assert release_kv(p, first.handle) is True  # what the gateway does with a handle it will not use
    # the worker keeps serving: the stream ends at once on Abort, the queued ones complete
    assert _abort(d, "run") is True
    assert list(running)[-1].finish_reason == pb.FINISH_REASON_ABORT
    expected = [list(o.token_ids) for o in reference.generate([w1, w2], GREEDY)]
    assert [_tokens(list(s)) for s in queued] == expected
    (again,) = random_prompts([30], reference.model_config.vocab_size, seed=42)
    assert _tokens(list(_decode(d, "again", again, GREEDY))) == list(reference.generate([again], GREEDY)[0].token_ids)
    assert wait_until(lambda: _idle(p, d), 5.0)


def test_important_request_sheds_least_important_queued_one(pair, reference: Engine) -> None:
    _, d = pair
    prompts = random_prompts([10, 20, 21, 22], reference.model_config.vocab_size, seed=43)
    running = _decode(d, "run2", prompts[0], LONG, priority=0)
    next(running)
    # arrival, priority -> outcome
    low_first = _decode(d, "p5-first", prompts[1], GREEDY, priority=5)
    assert wait_until(lambda: _load(d) == (1, 1), 10.0)
    low_second = _decode(d, "p5-second", prompts[2], GREEDY, priority=5)
    assert wait_until(lambda: _load(d) == (2, 1), 10.0)
    high = _decode(d, "p0", prompts[3], GREEDY, priority=0)
    with pytest.raises(grpc.RpcError) as err:
        list(low_second)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == "shed: priority 5 request displaced by priority 0 under overload"
    assert _load(d) == (2, 1)  # p5-first and p0 wait
    assert _abort(d, "run2") is True
    assert list(running)[-1].finish_reason == pb.FINISH_REASON_ABORT
    expected = [list(o.token_ids) for o in reference.generate([prompts[3], prompts[1]], GREEDY)]
    assert [_tokens(list(high)), _tokens(list(low_first))] == expected
    assert wait_until(lambda: _idle(d), 5.0)


def test_abort_ends_a_streaming_decode_at_once(pair, reference: Engine) -> None:
    p, d = pair
    local, remote, queued = random_prompts([10, 40, 12], reference.model_config.vocab_size, seed=44)
    first = prefill(p, "remote", remote, LONG, owner=OWNER)
    streams = {"local": _decode(d, "local", local, LONG), "remote": _decode(d, "remote", remote, LONG, first=first)}
    received = {name: next(stream) for name, stream in streams.items() if name == "local"}
    assert wait_until(lambda: _load(d) == (1, 1), 10.0)  # remote waits behind local (one slot)
    streams["queued"] = _decode(d, "queued", queued, LONG)
    assert wait_until(lambda: _load(d) == (2, 1), 10.0)
    for name in ("queued", "remote", "local"):  # queued, ready (KV pulled), running
        start = time.monotonic()
        assert _abort(d, name) is True
        rest = list(streams[name])
        assert time.monotonic() - start < ABORT_BOUND_S
        if name == "local":  # it was streaming: its last message may still carry tokens
            assert received["local"].token_ids and rest[-1].finish_reason == pb.FINISH_REASON_ABORT
        else:  # never ran here: one message, no token, finish reason ABORT
            assert [(list(m.token_ids), m.finish_reason) for m in rest] == [([], pb.FINISH_REASON_ABORT)], name
    assert wait_until(lambda: _abort_refused(d, "local"), 5.0)  # ended: its owner's call is gone with it
    assert wait_until(lambda: _idle(p, d), 5.0)


def test_abort_ends_a_queued_prefill_and_busy_prefill_worker_keeps_serving(pair, reference: Engine) -> None:
    p, _ = pair
    big, w1, w2, x, after = random_prompts([1500, 20, 21, 22, 23], reference.model_config.vocab_size, seed=45)
    calls = {"big": _prefill_future(p, "big", big)}
    assert wait_until(lambda: _load(p) == (0, 1), 10.0)  # one token per step: seconds of prefill
    for name, prompt in (("pw1", w1), ("pw2", w2)):
        calls[name] = _prefill_future(p, name, prompt)
    assert wait_until(lambda: _load(p) == (2, 1), 10.0)
    with pytest.raises(grpc.RpcError) as err:
        prefill(p, "px", x, GREEDY, owner=OWNER)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details() == (
        "worker p-busy is busy: waiting queue is full (2 waiting, max_waiting 2) "
        "and no queued request is less important than priority 0"
    )
    for name in ("pw2", "big"):  # queued, then running
        start = time.monotonic()
        assert _abort(p, name) is True
        with pytest.raises(grpc.RpcError) as err:
            calls[name].result(timeout=ABORT_BOUND_S)
        assert time.monotonic() - start < ABORT_BOUND_S
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert err.value.details() == f"request {name} was aborted"
    handle = calls["pw1"].result(timeout=30).handle
    assert handle.block_ids
    assert release_kv(p, handle) is True  # drops its lease
    first = prefill(p, "after", after, GREEDY, owner=OWNER)
    assert first.first_token == reference.generate([after], GREEDY)[0].token_ids[0]
    assert release_kv(p, first.handle) is True
    assert wait_until(lambda: _idle(p), 5.0)
