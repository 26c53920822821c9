"""The decode worker's checks of a KV handle (decode/handle_check.py, decode/sources.py):
exact reasons and messages for hashes that are not the prompt's and for sources that are not
registered, compatible prefill workers; the registry view's cache, shared reads and outages;
what a rejection records."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis
from opentelemetry.trace import INVALID_SPAN

from tandem.common.block_hash import block_extra, hash_blocks
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.common.metrics import WorkerMetrics
from tandem.common.request import Request, SamplingParams
from tandem.common.workers import WorkerInfo, WorkerRole
from tandem.decode.handle_check import (
    Compatibility,
    HandleRejectedError,
    HandleVerifier,
    RejectReason,
    check_block_hashes,
    check_source,
)
from tandem.decode.sources import SourceRegistry

BS = 16
LAYOUT = KVLayout("LlamaForCausalLM", 2, 2, 16, "float32", BS)
EXTRA = block_extra("tiny", None)
PROMPT_A = list(range(10, 50))  # 40 tokens: 2 full blocks and 8 more
PROMPT_B = list(range(10, 42)) + list(range(300, 308))  # the same 2 full blocks, another tail
PROMPT_C = list(range(10, 26)) + list(range(100, 124))  # block 0 as A's, block 1 differs
OURS = Compatibility(LAYOUT.fingerprint, "tiny")
SOURCE = WorkerInfo("p-1", WorkerRole.PREFILL, "127.0.0.1:5001", LAYOUT.fingerprint, 64, "0.1.0", BS, "tiny")


def handle(prompt: list[int], *, worker_id: str = "p-1", address: str = "127.0.0.1:5001", extra=EXTRA) -> KVHandle:
    return KVHandle(
        request_id="r",
        source_worker_id=worker_id,
        source_address=address,
        block_ids=tuple(range(-(-len(prompt) // BS))),
        num_tokens=len(prompt),
        layout=LAYOUT,
        block_hashes=tuple(hash_blocks(prompt, BS, extra)),
        lease_deadline_unix_s=0.0,
    )


def rejection(fn, *args) -> tuple[RejectReason, str]:
    with pytest.raises(HandleRejectedError) as err:
        fn(*args)
    return err.value.reason, err.value.args[0]


def test_hashes_of_the_prompt_pass() -> None:
    check_block_hashes(handle(PROMPT_A), PROMPT_A, BS, EXTRA)
    # only full blocks are hashed: another tail after the same full blocks has the same hashes
    # (the decode worker recomputes that partial block instead of pulling it)
    check_block_hashes(handle(PROMPT_A), PROMPT_B, BS, EXTRA)
    short = [5, 6, 7]
    check_block_hashes(handle(short), short, BS, EXTRA)  # no full block: nothing to compare


def test_another_prompts_hashes_are_rejected_naming_the_block() -> None:
    ours = hash_blocks(PROMPT_C, BS, EXTRA)
    theirs = hash_blocks(PROMPT_A, BS, EXTRA)
    assert rejection(check_block_hashes, handle(PROMPT_A), PROMPT_C, BS, EXTRA) == (
        RejectReason.HASH_MISMATCH,
        f"block 1 of the handle of request 'r' has hash {theirs[1]:016x}; "
        f"the prompt's block 1 hashes to {ours[1]:016x} here",
    )


def test_another_salt_or_model_is_another_prompt() -> None:
    salted = block_extra("tiny", "tenant-2")
    reason, message = rejection(check_block_hashes, handle(PROMPT_A), PROMPT_A, BS, salted)
    assert reason is RejectReason.HASH_MISMATCH and message.startswith("block 0 of the handle")
    other_model = handle(PROMPT_A, extra=block_extra("other", None))
    reason, message = rejection(check_block_hashes, other_model, PROMPT_A, BS, EXTRA)
    assert reason is RejectReason.HASH_MISMATCH and message.startswith("block 0 of the handle")


def test_a_handle_with_too_few_hashes_is_rejected() -> None:
    h = handle(PROMPT_A)
    truncated = KVHandle(**{**h.__dict__, "block_hashes": h.block_hashes[:1]})
    assert rejection(check_block_hashes, truncated, PROMPT_A, BS, EXTRA) == (
        RejectReason.HASH_MISMATCH,
        "the handle of request 'r' has 1 block hashes; the prompt has 2 full blocks",
    )


@pytest.mark.parametrize(
    ("info", "address", "reason", "message"),
    [
        (None, "127.0.0.1:5001", RejectReason.UNREGISTERED_SOURCE, "worker 'p-1' is not a registered, live worker"),
        (
            SOURCE,
            "127.0.0.1:6666",
            RejectReason.UNREGISTERED_SOURCE,
            "worker 'p-1' is registered at 127.0.0.1:5001, not at 127.0.0.1:6666",
        ),
        (
            WorkerInfo("p-1", WorkerRole.DECODE, "127.0.0.1:5001", LAYOUT.fingerprint, 64, "0.1.0", BS, "tiny"),
            "127.0.0.1:5001",
            RejectReason.INCOMPATIBLE_SOURCE,
            "worker 'p-1' is a decode worker, not a prefill worker",
        ),
        (
            WorkerInfo("p-1", WorkerRole.PREFILL, "127.0.0.1:5001", "abc123", 64, "0.1.0", BS, "tiny"),
            "127.0.0.1:5001",
            RejectReason.INCOMPATIBLE_SOURCE,
            f"worker 'p-1' is incompatible: fingerprint (ours {LAYOUT.fingerprint!r}, theirs 'abc123')",
        ),
        (
            WorkerInfo("p-1", WorkerRole.PREFILL, "127.0.0.1:5001", LAYOUT.fingerprint, 64, "0.1.0", BS, "big", 2),
            "127.0.0.1:5001",
            RejectReason.INCOMPATIBLE_SOURCE,
            "worker 'p-1' is incompatible: model_id (ours 'tiny', theirs 'big'), block_hash_version (ours 1, theirs 2)",
        ),
    ],
)
def test_sources_that_are_not_registered_compatible_prefill_workers(info, address, reason, message) -> None:
    assert rejection(check_source, handle(PROMPT_A, address=address), info, OURS) == (reason, message)


def test_a_registered_compatible_prefill_worker_passes() -> None:
    check_source(handle(PROMPT_A), SOURCE, OURS)


class FakeRegistry:
    """`ClusterState.get_worker` as SourceRegistry calls it: a thread, a dict, an outage switch
    and a gate that holds reads (to overlap them)."""

    def __init__(self) -> None:
        self.workers = {"p-1": SOURCE}
        self.down = False
        self.gate = threading.Event()
        self.gate.set()

    def get_worker(self, worker_id: str) -> WorkerInfo | None:
        assert self.gate.wait(5.0)
        if self.down:
            raise redis.ConnectionError("Connection refused")
        return self.workers.get(worker_id)


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def registry(fake: FakeRegistry, clock: Clock) -> SourceRegistry:
    return SourceRegistry(fake.get_worker, OURS, cache_ttl_s=1.0, stale_grace_s=5.0, clock=clock)


def check(sources: SourceRegistry, h: KVHandle) -> RejectReason | None:
    async def run() -> RejectReason | None:
        try:
            await sources.check(h)
        except HandleRejectedError as exc:
            return exc.reason
        return None

    return asyncio.run(run())


def test_registry_reads_are_cached_briefly() -> None:
    fake, clock = FakeRegistry(), Clock()
    sources = registry(fake, clock)
    assert [check(sources, handle(PROMPT_A)) for _ in range(3)] == [None, None, None]
    assert sources.num_reads == 1
    clock.now_s += 1.5  # past the cache TTL: read again
    assert check(sources, handle(PROMPT_A)) is None and sources.num_reads == 2
    # another address than the cached one is read again (the worker may have restarted there)
    fake.workers["p-1"] = WorkerInfo(
        "p-1", WorkerRole.PREFILL, "127.0.0.1:5002", LAYOUT.fingerprint, 64, "0", BS, "tiny"
    )
    assert check(sources, handle(PROMPT_A, address="127.0.0.1:5002")) is None and sources.num_reads == 3
    assert check(sources, handle(PROMPT_A)) is RejectReason.UNREGISTERED_SOURCE  # the old address
    del fake.workers["p-1"]  # drained or expired
    clock.now_s += 1.5
    assert check(sources, handle(PROMPT_A, address="127.0.0.1:5002")) is RejectReason.UNREGISTERED_SOURCE
    assert check(sources, handle(PROMPT_A, worker_id="p-9")) is RejectReason.UNREGISTERED_SOURCE
    assert sources.num_reads == 6  # absent workers are never cached


def test_concurrent_requests_share_one_read() -> None:
    fake, clock = FakeRegistry(), Clock()
    sources = registry(fake, clock)
    fake.gate.clear()

    async def run() -> list[object]:
        checks = [asyncio.ensure_future(sources.check(handle(PROMPT_A))) for _ in range(5)]
        await asyncio.sleep(0.05)
        fake.gate.set()
        return await asyncio.gather(*checks, return_exceptions=True)

    assert asyncio.run(run()) == [None] * 5
    assert sources.num_reads == 1


def test_redis_outage_uses_a_recent_confirmation_then_rejects() -> None:
    fake, clock = FakeRegistry(), Clock()
    sources = registry(fake, clock)
    assert check(sources, handle(PROMPT_A)) is None
    fake.down = True
    clock.now_s += 2.0  # cache expired, Redis down: the entry confirmed 2 s ago (< 5 s grace) stands
    assert check(sources, handle(PROMPT_A)) is None and sources.num_reads == 2
    clock.now_s += 0.5  # Redis failed less than a cache TTL ago: not asked again
    assert check(sources, handle(PROMPT_A)) is None and sources.num_reads == 2
    assert check(sources, handle(PROMPT_A, worker_id="p-9")) is RejectReason.REGISTRY_UNAVAILABLE
    clock.now_s += 3.0  # 5.5 s since the last confirmation: past the grace
    assert check(sources, handle(PROMPT_A)) is RejectReason.REGISTRY_UNAVAILABLE and sources.num_reads == 3
    fake.down = False
    clock.now_s += 1.5
    assert check(sources, handle(PROMPT_A)) is None and sources.num_reads == 4


def test_cache_ttl_must_not_exceed_the_grace() -> None:
    with pytest.raises(ValueError, match=r"need 0 < cache_ttl_s <= stale_grace_s, got 6.0 and 5.0"):
        SourceRegistry(FakeRegistry().get_worker, OURS, cache_ttl_s=6.0, stale_grace_s=5.0)


def _rejections(metrics: WorkerMetrics, reason: str) -> float | None:
    labels = {"worker_id": "d-1", "role": "decode", "reason": reason}
    return metrics.registry.get_sample_value("tandem_kv_handle_rejections_total", labels)


def test_a_rejection_is_counted_by_reason_and_as_a_recompute() -> None:
    metrics = WorkerMetrics("d-1", "decode", "tiny", 256)
    fake = FakeRegistry()
    verifier = HandleVerifier(BS, "tiny", registry(fake, Clock()), metrics, "d-1")

    def accept(prompt: list[int], h: KVHandle, salt: str | None = None) -> bool:
        request = Request("r", tuple(prompt), SamplingParams(), salt)
        return asyncio.run(verifier.accept(h, request, INVALID_SPAN))

    assert accept(PROMPT_A, handle(PROMPT_A)) is True
    assert accept(PROMPT_C, handle(PROMPT_A)) is False  # another prompt's handle
    assert accept(PROMPT_A, handle(PROMPT_A), salt="tenant-2") is False  # another tenant's
    assert accept(PROMPT_A, handle(PROMPT_A, address="127.0.0.1:6666")) is False  # not a registered address
    assert _rejections(metrics, "hash_mismatch") == 2
    assert _rejections(metrics, "unregistered_source") == 1
    assert _rejections(metrics, "incompatible_source") is None
    assert metrics.registry.get_sample_value("tandem_kv_recomputes_total", {"worker_id": "d-1", "role": "decode"}) == 3
    # without cluster state the source is not checked, the hashes still are
    alone = HandleVerifier(BS, "tiny", None, WorkerMetrics("d-1", "decode", "tiny", 256), "d-1")
    request = Request("r", tuple(PROMPT_C), SamplingParams())
    assert asyncio.run(alone.accept(handle(PROMPT_C, address="10.0.0.1:1"), request, INVALID_SPAN)) is True
    assert asyncio.run(alone.accept(handle(PROMPT_A), request, INVALID_SPAN)) is False
