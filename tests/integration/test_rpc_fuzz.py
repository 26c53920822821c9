"""The gRPC fuzz table (issue 16, deliverable 4): every worker method gets random bytes and a
table of adversarial, well-formed messages, each with the exact status it must answer; then the
workers still serve a request exactly, nothing leaked, and no traceback was logged.

Every call goes through tests/integration/workers.py (`worker_channel`), the one place where
credentials are attached to the calls.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError, Message

from tandem.common.pb import tandem_pb2 as pb
from tandem.engine import Engine, SamplingParams
from tandem.launcher.processes import ChildProcess
from tests.conftest import random_prompts
from tests.integration.workers import (
    STOP_TIMEOUT_S,
    call_raw,
    disaggregated,
    kv_stub,
    prefill,
    request_pb,
    start_worker,
    wait_until,
    worker_health,
    worker_stub,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
VOCAB, MAX_MODEL_LEN = 512, 2048  # the tiny model's
CODE = grpc.StatusCode

# method -> (request type, response streaming, served by prefill, served by decode)
METHODS: dict[str, tuple[type[Message], bool, bool, bool]] = {
    "/tandem.v1.Worker/Prefill": (pb.PrefillRequest, False, True, False),
    "/tandem.v1.Worker/Decode": (pb.DecodeRequest, True, False, True),
    "/tandem.v1.Worker/Abort": (pb.AbortRequest, False, True, True),
    "/tandem.v1.Worker/Health": (pb.HealthRequest, False, True, True),
    "/tandem.v1.Worker/Drain": (pb.DrainRequest, False, True, True),
    "/tandem.v1.KVTransfer/PullKV": (pb.PullKVRequest, True, True, False),
    "/tandem.v1.KVTransfer/ReleaseKV": (pb.ReleaseKVRequest, False, True, False),
}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, num_blocks=256)


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path):
    p = start_worker("prefill", tiny_model_dir, worker_id="p-fuzz")
    d = start_worker("decode", tiny_model_dir, worker_id="d-fuzz")
    yield p, d
    assert d.stop(STOP_TIMEOUT_S) == 0
    assert p.stop(STOP_TIMEOUT_S) == 0


def _parses(message_type: type[Message], payload: bytes) -> bool:
    try:
        message_type.FromString(payload)
    except DecodeError:
        return False
    return True


def _undecodable(message_type: type[Message], rng: random.Random, count: int) -> list[bytes]:
    """`count` random byte strings (1 to 64 bytes) that do not parse as `message_type`."""
    found: list[bytes] = []
    while len(found) < count:
        payload = rng.randbytes(rng.randint(1, 64))
        if not _parses(message_type, payload):
            found.append(payload)
    return found


def _pools_free(*workers: ChildProcess) -> bool:
    for w in workers:
        h = worker_health(w)
        if h.free_blocks != h.total_blocks or h.held_leases or h.waiting or h.running or h.draining:
            return False
    return True


def test_random_bytes_get_invalid_argument_on_every_method(pair) -> None:
    p, d = pair
    rng = random.Random(16)
    for method, (message_type, streaming, on_prefill, on_decode) in METHODS.items():
        fixed = [b"\x00", b"\xff\xff\xff", b"\x0a\x05\x12\x03\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f"]
        payloads = [x for x in fixed if not _parses(message_type, x)] + _undecodable(message_type, rng, 12)
        for worker, served in ((p, on_prefill), (d, on_decode)):
            for payload in payloads:
                code, details = call_raw(worker, method, payload, streaming)
                if not served and method.startswith("/tandem.v1.Worker/"):
                    assert (code, details) == (CODE.UNIMPLEMENTED, f"{method} is not served by this worker")
                elif not served:  # the KVTransfer service is not registered on a decode worker
                    assert (code, details) == (CODE.UNIMPLEMENTED, "Method not found!")
                else:
                    name = message_type.DESCRIPTOR.full_name
                    assert code == CODE.INVALID_ARGUMENT, (method, payload, code, details)
                    assert details.startswith(f"the request to {method} does not parse: Error parsing message")
                    assert f"'{name}'" in details
    # A request over the server's 16 MiB limit is refused by gRPC before anything parses it.
    code, _ = call_raw(p, "/tandem.v1.Worker/Prefill", b"\x0a" + b"\xff" * (17 << 20), streaming=False)
    assert code == CODE.RESOURCE_EXHAUSTED
    # An undecodable Drain drained nothing; the throttled log has one line per method, no traceback.
    for worker in (p, d):
        assert worker_health(worker).draining is False
        tail = worker.output_tail()
        assert "Traceback" not in tail
        assert tail.count("undecodable request to /tandem.v1.Worker/Abort") == 1


@dataclass(frozen=True)
class Row:
    name: str
    call: Callable[[ChildProcess], object]  # raises grpc.RpcError with the expected status
    code: grpc.StatusCode
    details: str


def _prefill_req(request_id: str = "adv", prompt: list[int] | None = None, **sampling: object) -> pb.PrefillRequest:
    req = request_pb(request_id, prompt if prompt is not None else [5, 6, 7], GREEDY)
    for field, value in sampling.items():
        if isinstance(value, list):
            getattr(req.sampling, field).extend(value)
        else:
            setattr(req.sampling, field, value)
    return pb.PrefillRequest(request=req)


def _with(msg: pb.PrefillRequest, **fields: object) -> pb.PrefillRequest:
    for field, value in fields.items():
        setattr(msg.request, field, value)
    return msg


def _prefill_rows() -> list[Row]:
    def call(msg: pb.PrefillRequest) -> Callable[[ChildProcess], object]:
        return lambda w: worker_stub(w).Prefill(msg, timeout=60)

    bad = CODE.INVALID_ARGUMENT
    no_sampling = _prefill_req()
    no_sampling.request.ClearField("sampling")
    prompt_limit = "request.prompt_token_ids must have 1 to 1048576 tokens"
    return [
        Row("empty prompt", call(_prefill_req(prompt=[])), bad, prompt_limit),
        Row("2^20 + 1 prompt tokens", call(_prefill_req(prompt=[1] * ((1 << 20) + 1))), bad, prompt_limit),
        Row(
            "prompt as long as the context",
            call(_prefill_req(prompt=[1] * MAX_MODEL_LEN)),
            bad,
            f"prompt has {MAX_MODEL_LEN} tokens; the maximum context length is {MAX_MODEL_LEN} tokens, "
            "which must leave room for at least one generated token",
        ),
        Row(
            "negative token id",
            call(_prefill_req(prompt=[1, -1])),
            bad,
            "request.prompt_token_ids holds an out-of-range token id",
        ),
        Row(
            "token id 2^63 - 1",
            call(_prefill_req(prompt=[2**63 - 1])),
            bad,
            "request.prompt_token_ids holds an out-of-range token id",
        ),
        Row(
            "token id = vocab size",
            call(_prefill_req(prompt=[1, VOCAB])),
            bad,
            f"prompt token id {VOCAB} is out of range [0, {VOCAB})",
        ),
        Row(
            "empty request id",
            call(_prefill_req("")),
            bad,
            "request.request_id must have 1 to 256 characters",
        ),
        Row(
            "request id of 257 characters",
            call(_prefill_req("r" * 257)),
            bad,
            "request.request_id must have 1 to 256 characters",
        ),
        Row("no sampling", call(no_sampling), bad, "request.sampling is required"),
        Row(
            "min_tokens over max_tokens",
            call(_prefill_req(max_tokens=2, min_tokens=3)),
            bad,
            "min_tokens (3) must be at most max_tokens (2)",
        ),
        Row(
            "logit_bias without values",
            call(_prefill_req(logit_bias_token_ids=[5])),
            bad,
            "sampling.logit_bias_token_ids and logit_bias_values differ in length",
        ),
        Row(
            "temperature NaN",
            call(_prefill_req(temperature=float("nan"))),
            bad,
            "temperature must be a finite number >= 0, got nan",
        ),
        Row(
            "temperature -1",
            call(_prefill_req(temperature=-1.0)),
            bad,
            "temperature must be a finite number >= 0, got -1.0",
        ),
        Row("top_p 0", call(_prefill_req(top_p=0.0)), bad, "top_p must be in (0, 1], got 0.0"),
        Row("top_p inf", call(_prefill_req(top_p=float("inf"))), bad, "top_p must be in (0, 1], got inf"),
        Row("top_k 0", call(_prefill_req(top_k=0)), bad, "top_k must be None or an integer >= 1, got 0"),
        Row(
            "logprobs 2^32 - 1",
            call(_prefill_req(logprobs=2**32 - 1)),
            bad,
            "logprobs must be None or an integer in [0, 20], got 4294967295",
        ),
        Row(
            "1025 stop token ids",
            call(_prefill_req(stop_token_ids=list(range(1025)))),
            bad,
            "sampling.stop_token_ids: at most 1024 entries",
        ),
        Row(
            "priority 2^31",
            call(_with(_prefill_req(), priority=2**31)),
            bad,
            "request.priority must be in [-2147483648, 2147483647], got 2147483648",
        ),
        Row(
            "cache salt of 257 characters",
            call(_with(_prefill_req(), cache_salt="s" * 257)),
            bad,
            "request.cache_salt is too long",
        ),
    ]


def _status(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        result = fn()
        if not isinstance(result, Message):  # a stream: read it to its end
            result = list(result)  # type: ignore[call-overload]
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return CODE.OK, ""


def test_adversarial_prefill_messages_get_exact_statuses(pair) -> None:
    p, _ = pair
    for row in _prefill_rows():
        assert _status(functools.partial(row.call, p)) == (row.code, row.details), row.name
    assert _pools_free(p)


def _decode_msg(request_id: str, prompt: list[int], first: pb.PrefillResponse, **handle: object) -> pb.DecodeRequest:
    msg = pb.DecodeRequest(request=request_pb(request_id, prompt, GREEDY), first_token=first.first_token)
    msg.handle.CopyFrom(first.handle)
    for field, value in handle.items():
        if isinstance(value, list):
            msg.handle.ClearField(field)
            getattr(msg.handle, field).extend(value)
        else:
            setattr(msg.handle, field, value)
    return msg


def test_adversarial_handoff_messages_get_exact_statuses(pair, reference: Engine) -> None:
    """Decode with forged handles, PullKV and ReleaseKV of other leases, Abort and Health with
    absurd fields: each refused (or answered) exactly, before anything is reserved or pulled."""
    p, d = pair
    prompt_a, prompt_b = random_prompts([40, 20], VOCAB, seed=161)
    first_a = prefill(p, "lease-a", prompt_a, GREEDY)
    first_b = prefill(p, "lease-b", prompt_b, GREEDY)
    blocks_a, blocks_b = list(first_a.handle.block_ids), list(first_b.handle.block_ids)
    layout = first_a.handle.layout

    def decode(msg: pb.DecodeRequest) -> Callable[[], object]:
        return lambda: worker_stub(d).Decode(msg, timeout=60)

    secrets = {"lease-a": first_a.handle.lease_secret}  # a peer that holds lease A's handle

    hash_of = dict(zip(blocks_a, first_a.handle.block_hashes))  # lease A's full blocks

    def pull(
        request_id: str, block_ids: list[int], layout_text: str = layout, hashes: list[int] | None = None
    ) -> Callable[[], object]:
        msg = pb.PullKVRequest(
            request_id=request_id,
            block_ids=block_ids,
            layout=layout_text,
            max_chunk_bytes=2**32 - 1,
            lease_secret=secrets.get(request_id, b""),
            block_hashes=[hash_of.get(b, 0) for b in block_ids] if hashes is None else hashes,
        )
        return lambda: kv_stub(p).PullKV(msg, timeout=60)

    no_first = _decode_msg("lease-a", prompt_a, first_a)
    no_first.ClearField("first_token")
    bad, missing, mismatch = CODE.INVALID_ARGUMENT, CODE.NOT_FOUND, CODE.FAILED_PRECONDITION
    big_layout = layout.replace("block_size=16", "block_size=32")
    table: list[tuple[str, Callable[[], object], grpc.StatusCode, str]] = [
        ("handle without first_token", decode(no_first), bad, "a KV handle needs first_token"),
        (
            "handle of another request",
            decode(_decode_msg("lease-b", prompt_b, first_a)),
            bad,
            "handle.request_id differs from request.request_id",
        ),
        (
            "handle claiming 2^32 - 1 tokens",
            decode(_decode_msg("lease-a", prompt_a, first_a, num_tokens=2**32 - 1)),
            bad,
            "handle covers 4294967295 tokens in 3 blocks; the prompt has 40 tokens",
        ),
        (
            "handle naming 2^20 + 1 blocks",
            decode(_decode_msg("lease-a", prompt_a, first_a, block_ids=list(range((1 << 20) + 1)))),
            bad,
            "KV handle names 1048577 blocks and 2 block hashes",
        ),
        (
            "handle repeating a block id",
            decode(_decode_msg("lease-a", prompt_a, first_a, block_ids=[blocks_a[0]] * 3)),
            bad,
            "KV handle repeats a block id",
        ),
        (
            "handle without a source address",
            decode(_decode_msg("lease-a", prompt_a, first_a, source_address="")),
            bad,
            "KV handle needs a request_id and a source_address",
        ),
        (
            "handle with a 1 kB source address",
            decode(_decode_msg("lease-a", prompt_a, first_a, source_address="h" * 1000 + ":1")),
            bad,
            "KV handle source_address must have at most 512 characters",
        ),
        (
            "handle with a NaN lease deadline",
            decode(_decode_msg("lease-a", prompt_a, first_a, lease_deadline_unix_s=float("nan"))),
            bad,
            "KV handle lease_deadline_unix_s must be finite",
        ),
        (
            "handle with a malformed layout",
            decode(_decode_msg("lease-a", prompt_a, first_a, layout="not a layout")),
            bad,
            "handle.layout: malformed KV layout field 'not a layout'",
        ),
        (
            "handle with another block size",
            decode(_decode_msg("lease-a", prompt_a, first_a, layout=big_layout)),
            mismatch,
            "KV layout mismatch: block_size (ours 16, theirs 32)",
        ),
        (
            "first token out of the vocabulary",
            decode(_decode_msg("lease-a", prompt_a, pb.PrefillResponse(first_token=VOCAB, handle=first_a.handle))),
            bad,
            f"generated token ids must be in [0, {VOCAB})",
        ),
        (
            "pull of an unknown lease",
            pull("nobody", blocks_a),
            missing,
            "no lease for request 'nobody' (unknown request id, or not its secret)",
        ),
        (
            "pull of lease A with lease B's blocks",
            pull("lease-a", blocks_b[:1]),
            missing,
            f"block id {blocks_b[0]} is not in the lease for request 'lease-a'",
        ),
        (
            "pull of block id 2^32 - 1",
            pull("lease-a", [2**32 - 1]),
            missing,
            f"block id {2**32 - 1} is not in the lease for request 'lease-a'",
        ),
        (
            "pull of lease A's blocks claiming other hashes",
            pull("lease-a", blocks_a[:2], hashes=[h ^ 1 for h in first_a.handle.block_hashes]),
            mismatch,
            f"block hashes differ from the lease's for request 'lease-a': block {blocks_a[0]} has hash "
            f"{first_a.handle.block_hashes[0]:#018x}, the receiver expects {first_a.handle.block_hashes[0] ^ 1:#018x}",
        ),
        (
            "pull of lease A's partial block",
            pull("lease-a", blocks_a[2:]),
            mismatch,
            f"block hashes differ from the lease's for request 'lease-a': block {blocks_a[2]} is not a full block"
            " (it has no hash)",
        ),
        (
            "pull with fewer hashes than block ids",
            pull("lease-a", blocks_a[:2], hashes=[1]),
            bad,
            "the request to /tandem.v1.KVTransfer/PullKV does not parse: 1 block hashes for 2 block ids",
        ),
        ("pull of no blocks", pull("lease-a", []), bad, "0 block ids requested; a pull moves 1..65536"),
        (
            "pull of 65537 blocks",
            pull("lease-a", list(range(65537))),
            bad,
            "65537 block ids requested; a pull moves 1..65536",
        ),
        (
            "pull with a malformed layout",
            pull("lease-a", blocks_a, "x"),
            mismatch,
            "receiver layout: malformed KV layout field 'x'",
        ),
        (
            "pull with another block size",
            pull("lease-a", blocks_a, big_layout),
            mismatch,
            "KV layout mismatch: block_size (ours 16, theirs 32)",
        ),
        (
            "release of an unknown lease",
            lambda: kv_stub(p).ReleaseKV(pb.ReleaseKVRequest(request_id="x" * 100_000), timeout=60),
            CODE.OK,
            "",
        ),
        (
            "abort of a 1 MB request id",
            lambda: worker_stub(p).Abort(pb.AbortRequest(request_id="x" * 1_000_000), timeout=60),
            missing,
            f"no live request {'x' * 256!r}... (1000000 characters) submitted with this call's x-tandem-owner"
            " on this worker",
        ),
        (
            "abort of an empty request id",
            lambda: worker_stub(d).Abort(pb.AbortRequest(), timeout=60),
            missing,
            "no live request '' submitted with this call's x-tandem-owner on this worker",
        ),
    ]
    for name, call, code, details in table:
        assert _status(call) == (code, details), name
    # Both leases are intact: the decode worker pulls each one and answers exactly.
    for request_id, prompt, first in (("lease-a", prompt_a, first_a), ("lease-b", prompt_b, first_b)):
        deltas = list(worker_stub(d).Decode(_decode_msg(request_id, prompt, first), timeout=60))
        # only full blocks are pulled (the tail is recomputed: decode/handle_check.py)
        assert deltas[0].recomputed is False and deltas[0].num_pulled_blocks == len(prompt) // 16
        tokens = [first.first_token] + [t for delta in deltas for t in delta.token_ids]
        assert tokens == list(reference.generate([prompt], GREEDY)[0].token_ids)
    assert wait_until(lambda: _pools_free(p, d), 5.0)


def test_absurd_but_legal_sampling_is_served_exactly_after_the_table(pair, reference: Engine) -> None:
    """top_k 2^32 - 1, the extreme seeds and stop token ids, max_tokens 2^32 - 1 (clamped to the
    context): legal, so served; greedy makes the output exact. Then a normal request is exact."""
    p, d = pair
    (prompt,) = random_prompts([24], VOCAB, seed=162)
    absurd = _prefill_req(
        "absurd", prompt, top_k=2**32 - 1, seed=-(2**63), stop_token_ids=[2**63 - 1, -(2**63)], max_tokens=2**32 - 1
    )
    first = worker_stub(p).Prefill(absurd, timeout=60)
    assert first.first_token == reference.generate([prompt], GREEDY)[0].token_ids[0]
    released = kv_stub(p).ReleaseKV(
        pb.ReleaseKVRequest(request_id="absurd", lease_secret=first.handle.lease_secret), timeout=60
    )
    assert released.released is True
    (normal,) = random_prompts([33], VOCAB, seed=163)
    tokens, deltas = disaggregated(p, d, "after-the-table", normal, GREEDY)
    assert tokens == list(reference.generate([normal], GREEDY)[0].token_ids)
    assert deltas[0].recomputed is False
    assert wait_until(lambda: _pools_free(p, d), 5.0)
