"""The multiplexed decode stream (issue 20 item 1) between the gateway's client side
(gateway/mux.py) and real decode and prefill worker processes (decode/mux.py).

Exact tokens under concurrency, one MuxStep for many requests, a stopped consumer that does
not delay the others and is aborted when its buffer fills, a killed worker that errors out
every request on its stream, and a killed gateway whose requests are all freed on the worker.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tandem.common import codec, mux_codec
from tandem.common.ownership import new_owner_secret
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.plane_auth import aio_channel
from tandem.engine import Engine, SamplingParams
from tandem.gateway.migration import WORKER_FAILURES
from tandem.gateway.mux import BufferOverflow, MuxConnection
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.integration.workers import (
    REPO_ROOT,
    STOP_TIMEOUT_S,
    cluster_token,
    prefill,
    start_worker,
    wait_until,
    worker_health,
)

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
FULL_TIMEOUT_S = 0.25  # a stopped consumer's buffer stays full this long before it is aborted
# the stopped consumer's request: long enough to still be running when its buffer gives up
STALLED = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=256)


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, redis_server):
    common = ("--redis", redis_server.url, "--heartbeat-ttl-s", "2")
    p = start_worker("prefill", tiny_model_dir, *common, worker_id="p-mux")
    d = start_worker("decode", tiny_model_dir, *common, worker_id="d-mux")
    yield p, d
    assert d.stop(STOP_TIMEOUT_S) == 0
    assert p.stop(STOP_TIMEOUT_S) == 0


def _drained(*workers: ChildProcess) -> bool:
    for w in workers:
        h = worker_health(w)
        if h.free_blocks != h.total_blocks or h.held_leases or h.waiting or h.running:
            return False
    return True


def _submit(request_id: str, prompt: list[int], params: SamplingParams, first=None) -> mux_codec.MuxSubmit:
    request = codec.Request(request_id, tuple(prompt), params)
    if first is None:
        return mux_codec.MuxSubmit(codec.DecodeRequest(request), new_owner_secret())
    handle = codec.prefill_result_from_proto(first).handle
    return mux_codec.MuxSubmit(codec.DecodeRequest(request, first.first_token, handle), new_owner_secret())


async def _collect(conn: MuxConnection, submit: mux_codec.MuxSubmit) -> tuple[list[int], list[float]]:
    """The request's tokens and the gaps (s) between its deltas."""
    stream = conn.submit(submit)
    tokens: list[int] = []
    gaps: list[float] = []
    last = time.monotonic()
    try:
        while True:
            delta = await stream.get(30.0)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            tokens.extend(delta.token_ids)
            if delta.finish_reason is not None:
                return tokens, gaps
    finally:
        conn.release(stream)


def _connect(worker: ChildProcess, max_buffered: int = 256) -> tuple[grpc.aio.Channel, MuxConnection]:
    channel = aio_channel(worker.address, cluster_token())
    return channel, MuxConnection(pb_grpc.WorkerStub(channel), worker.address, max_buffered, FULL_TIMEOUT_S)


def test_exact_tokens_under_concurrency_in_shared_steps(pair, reference: Engine) -> None:
    p, d = pair
    prompts = random_prompts([5, 17, 40, 64, 100, 150, 23, 33], reference.model_config.vocab_size, seed=71)
    expected = [list(o.token_ids) for o in reference.generate(prompts, GREEDY)]
    firsts = [prefill(p, f"mux-exact-{i}", prompt, GREEDY) if i % 2 else None for i, prompt in enumerate(prompts)]

    async def run() -> tuple[list[list[int]], int, int, int]:
        channel, conn = _connect(d)
        try:
            submits = [_submit(f"mux-exact-{i}", prompt, GREEDY, firsts[i]) for i, prompt in enumerate(prompts)]
            results = await asyncio.gather(*(_collect(conn, s) for s in submits))
            return [tokens for tokens, _ in results], conn.num_steps, conn.num_outputs, conn.num_writes
        finally:
            await conn.close()
            await channel.close()

    got, num_steps, num_outputs, num_writes = asyncio.run(run())
    for i, tokens in enumerate(got):
        head = [firsts[i].first_token] if firsts[i] is not None else []
        assert head + tokens == expected[i], f"prompt {i}"
    assert num_outputs >= 8 * 2  # at least the first and the last delta of each request
    assert num_steps < num_outputs  # steps carried several requests' outputs at once
    # the 8 submits were queued in one loop turn, before the writer woke: one MuxBatch (and no
    # cancel: every request finished on the worker)
    assert num_writes == 1
    assert wait_until(lambda: _drained(p, d), 5.0)


def test_stopped_consumer_does_not_delay_the_others_and_is_aborted(pair, reference: Engine) -> None:
    _, d = pair
    prompts = random_prompts([30, 31, 32, 33, 34], reference.model_config.vocab_size, seed=72)
    readers = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    expected = [list(o.token_ids) for o in reference.generate(prompts[1:], readers)]

    async def run() -> tuple[list[tuple[list[int], list[float]]], list[int], BaseException | None]:
        channel, conn = _connect(d, max_buffered=4)
        try:
            stalled = conn.submit(_submit("mux-stalled", prompts[0], STALLED))
            others = await asyncio.gather(
                *(_collect(conn, _submit(f"mux-reader-{i}", pr, readers)) for i, pr in enumerate(prompts[1:]))
            )
            # the stopped consumer reads nothing until its buffer gave up (released here)
            deadline = time.monotonic() + 30.0
            while conn.num_requests and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            buffered: list[int] = []
            error: BaseException | None = None
            try:
                while True:
                    delta = await stalled.get(30.0)
                    assert delta.finish_reason is None, "the stopped request ran to its end"
                    buffered.extend(delta.token_ids)
            except BufferOverflow as exc:
                error = exc
            conn.release(stalled)
            return others, buffered, error
        finally:
            await conn.close()
            await channel.close()

    others, buffered, error = asyncio.run(run())
    assert [tokens for tokens, _ in others] == expected
    assert max(gap for _, gaps in others for gap in gaps[1:]) < 2.0  # no wait on the stopped one
    assert str(error) == (
        "the request read its output too slowly: its buffer of 4 decode messages stayed full for 0.25 s, "
        "so it was aborted"
    )
    assert (
        len(buffered) >= 4 and buffered == list(reference.generate([prompts[0]], STALLED)[0].token_ids)[: len(buffered)]
    )
    assert wait_until(lambda: _drained(d), 5.0)  # the stopped request was aborted on the worker


def test_killed_worker_errors_out_every_request(tiny_model_dir: Path, reference: Engine) -> None:
    d = start_worker("decode", tiny_model_dir, worker_id="d-mux-killed")
    prompts = random_prompts([20, 21, 22, 23], reference.model_config.vocab_size, seed=73)

    async def run() -> list[BaseException]:
        channel, conn = _connect(d)
        try:
            streams = [conn.submit(_submit(f"mux-kill-{i}", pr, LONG)) for i, pr in enumerate(prompts)]
            for s in streams:
                await s.get(30.0)
            d.kill()
            errors: list[BaseException] = []
            for s in streams:
                try:
                    while True:
                        await s.get(30.0)
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc)
            assert not conn.alive
            return errors
        finally:
            await conn.close()
            await channel.close()

    errors = asyncio.run(run())
    assert len(errors) == 4
    assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() in WORKER_FAILURES for e in errors)


_GATEWAY = """
import asyncio, sys
from tandem.common import codec, mux_codec
from tandem.common.ownership import new_owner_secret
from tandem.common.pb import tandem_pb2_grpc as pb_grpc
from tandem.common.plane_auth import aio_channel, ClusterToken
from tandem.engine import SamplingParams
from tandem.gateway.mux import MuxConnection
import os

async def main():
    channel = aio_channel(sys.argv[1], ClusterToken(os.environ["TANDEM_CLUSTER_TOKEN"]))
    conn = MuxConnection(pb_grpc.WorkerStub(channel), sys.argv[1], 1 << 20, 60.0)
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    requests = [codec.Request(f"mux-gw-{i}", tuple(range(1, 30 + i)), params) for i in range(4)]
    streams = [conn.submit(mux_codec.MuxSubmit(codec.DecodeRequest(r), new_owner_secret())) for r in requests]
    for s in streams:
        await s.get(30.0)
    print("streaming", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_killed_gateway_frees_everything_on_the_worker(pair) -> None:
    _, d = pair
    gateway = subprocess.Popen(
        [sys.executable, "-c", _GATEWAY, d.address], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert gateway.stdout is not None
        assert gateway.stdout.readline().strip() == "streaming"
        assert worker_health(d).running == 4
        gateway.kill()
        gateway.wait(10)
        start = time.monotonic()
        assert wait_until(lambda: _drained(d), 5.0)
        assert time.monotonic() - start < 5.0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(10)
