"""A decode worker's hand-off releases each lease once (decode/handoff.py, step 4): a verified
same-host one-copy pull releases it on its own stream and its stats say `released`, so no
ReleaseKV call reaches the source; a failed pull (then a recompute) still sends ReleaseKV.

The decode side is a real `Worker` (engine, step loop, its `SameHostTransport` with
`release_with_pull`) and `HandOffs` in this process; the source is a shared-pool KV store
served as a CPU prefill worker serves it, with ReleaseKV calls counted there."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from tandem.common.plane_auth import PlaneAuth
from tandem.common.request import Request, SamplingParams
from tandem.common.tracing import ClockAnchor
from tandem.common.workers import WorkerRole
from tandem.decode.handoff import HandOffs
from tandem.decode.stream import FirstDelta
from tandem.engine.outputs import RequestOutput
from tandem.kvtransfer import grpc_transport
from tandem.kvtransfer.config import KVTransferConfig
from tandem.worker.config import WorkerConfig
from tandem.worker.worker import Worker
from tests.conftest import random_prompts
from tests.integration.test_shm_pool_source import CorruptDigest, pooled_source
from tests.integration.test_shm_transport import serving

BLOCKS = (10, 11)  # the source's leased prompt blocks: the prompt's two full blocks
PROMPT_TOKENS = 2 * 16 + 3
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
SETTLE_S = 0.3  # after the request ended: time for a background ReleaseKV to arrive


@pytest.fixture
def release_calls(monkeypatch) -> list[str]:
    """The request ids of the ReleaseKV calls the source's servicer answered."""
    calls: list[str] = []
    original = grpc_transport.KVTransferServicer.ReleaseKV

    async def counted(self: Any, request: Any, context: grpc.aio.ServicerContext) -> bool:
        calls.append(request.request_id)
        return await original(self, request, context)

    monkeypatch.setattr(grpc_transport.KVTransferServicer, "ReleaseKV", counted)
    return calls


def decode_worker(model_dir: Path, shm_dir: Path) -> Worker:
    kv = KVTransferConfig(shm_dir=str(shm_dir), host_id="host-a")
    config = WorkerConfig(
        role=WorkerRole.DECODE,
        worker_id="d-0",
        model_dir=model_dir,
        kv_transfer=kv,
        plane=PlaneAuth(insecure_no_auth=True),
    )
    return Worker(config)


def hand_off(worker: Worker, tmp_path: Path) -> tuple[list[str], list[str], FirstDelta]:
    """One hand-off of a same-host lease, run to the request's end: (the source's freed
    leases, the worker's finish reasons, the first delta's hand-off report)."""

    async def run() -> tuple[list[str], list[str], FirstDelta]:
        source = pooled_source(worker.layout, tmp_path)
        grant = source.grant("h-0", BLOCKS)
        assert grant.secret
        [prompt] = random_prompts([PROMPT_TOKENS], worker.engine.model_config.vocab_size, seed=5)
        request = Request("h-0", tuple(prompt), GREEDY)
        ended = threading.Event()
        reasons: list[str] = []

        def deliver(out: RequestOutput) -> None:  # the loop thread
            if out.finish_reason is not None:
                reasons.append(out.finish_reason.value)
                ended.set()

        async with serving(source, tmp_path) as (address, _):
            handle = dataclasses.replace(source.handle(address, "h-0", BLOCKS), source_host_id="host-a")
            hand_offs, header = HandOffs(worker), FirstDelta()
            span = worker.tracing.tracer.start_span("decode")
            context = cast(grpc.aio.ServicerContext, None)  # used only to refuse a call: none is refused
            await hand_offs.run(request, 7, handle, header, deliver, context, span, ClockAnchor.now())
            span.end()
            assert await asyncio.to_thread(ended.wait, 30.0)
            await asyncio.sleep(SETTLE_S)
            freed = list(source.freed)
        await worker.transport.close()
        return freed, reasons, header

    worker.loop.start()
    try:
        return asyncio.run(run())
    finally:
        worker.loop.stop()


def test_a_same_host_one_copy_hand_off_sends_no_release_kv(
    tiny_model_dir: Path, tmp_path: Path, release_calls: list[str]
) -> None:
    worker = decode_worker(tiny_model_dir, tmp_path)
    freed, reasons, header = hand_off(worker, tmp_path)
    assert (header.recomputed, header.num_pulled_blocks) == (False, len(BLOCKS))
    assert reasons == ["length"]
    assert freed == ["h-0"]  # released by the pull, on its own stream
    assert release_calls == []
    assert (
        worker.metrics.registry.get_sample_value(
            "tandem_kv_pulls_total", {"worker_id": "d-0", "role": "decode", "transport": "shm"}
        )
        == 1.0
    )


def test_a_failed_same_host_pull_still_sends_release_kv(
    tiny_model_dir: Path, tmp_path: Path, release_calls: list[str], monkeypatch
) -> None:
    monkeypatch.setattr("tandem.kvtransfer.same_host.ShmKVServicer", CorruptDigest)  # checksum: fail closed
    worker = decode_worker(tiny_model_dir, tmp_path)
    freed, reasons, header = hand_off(worker, tmp_path)
    assert (header.recomputed, header.num_pulled_blocks) == (True, 0)
    assert reasons == ["length"]
    assert freed == ["h-0"]  # by ReleaseKV
    assert release_calls == ["h-0"]
    assert (
        worker.metrics.registry.get_sample_value(
            "tandem_kv_transfer_failures_total", {"worker_id": "d-0", "role": "decode", "reason": "checksum"}
        )
        == 1.0
    )
