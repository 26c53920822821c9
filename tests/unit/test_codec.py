"""The codec owns the wire: only tandem/common/codec.py, kv_codec.py and mux_codec.py build or read
protobuf messages, and every message they translate comes back equal."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from tandem.common import codec, kv_codec
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import MAX_PRIORITY, MIN_PRIORITY, FinishReason, Request, SamplingParams, TokenLogprob
from tandem.common.workers import WorkerRole

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = KVLayout("llama", num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32", block_size=16)
SECRET = bytes(range(100, 132))  # a lease's secret: 32 bytes
HANDLE = KVHandle("r1", "p0", "10.0.0.1:50051", (3, 4, 9), 40, LAYOUT, (7, 8), 123.5, SECRET)
REQUEST = Request("r1", (1, 2, 3), SamplingParams(max_tokens=4, temperature=0.0, top_k=5, logprobs=2), "salt")


def _imports_pb2(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (
            (node.module or "").endswith("tandem_pb2") or any(a.name == "tandem_pb2" for a in node.names)
        ):
            return True
        if isinstance(node, ast.Import) and any(a.name.endswith("tandem_pb2") for a in node.names):
            return True
    return False


def test_only_the_codec_modules_import_the_protobuf_messages() -> None:
    """The generated modules themselves (common/pb/) are exempt; `tandem_pb2_grpc` (stubs and
    servicer registration) is allowed anywhere."""
    files = [p for top in ("services", "kernels", "loadtest") for p in (ROOT / top).rglob("*.py")]
    offenders = [
        str(p.relative_to(ROOT)) for p in files if "pb" not in p.relative_to(ROOT).parts[:-1] and _imports_pb2(p)
    ]
    assert sorted(offenders) == [
        "services/tandem/common/codec.py",
        "services/tandem/common/kv_codec.py",
        "services/tandem/common/mux_codec.py",
    ]


def test_request_prefill_and_decode_messages_round_trip() -> None:
    assert codec.prefill_request_from_proto(codec.prefill_request_to_proto(REQUEST)) == REQUEST
    lp = TokenLogprob(5, -0.25, ((5, -0.25), (6, -1.5)))
    handed_off = codec.PrefillResult(11, lp, None, HANDLE, 16, 0.5, 0.25)
    finished = codec.PrefillResult(0, None, FinishReason.STOP, None, 0, 0.0, 0.125)
    for result in (handed_off, finished):
        assert codec.prefill_result_from_proto(codec.prefill_result_to_proto(result)) == result
    for call in (codec.DecodeRequest(REQUEST), codec.DecodeRequest(REQUEST, 11, HANDLE)):
        assert codec.decode_request_from_proto(codec.decode_request_to_proto(call)) == call
    first = codec.DecodeDelta((1, 2), (lp, lp), None, False, 32, 2, True, 0.5, 0.25)
    for delta in (first, codec.DecodeDelta((3,), (), FinishReason.LENGTH), codec.DecodeDelta((), failed=True)):
        assert codec.decode_delta_from_proto(codec.decode_delta_to_proto(delta)) == delta
    assert codec.decode_delta_to_proto(codec.DecodeDelta((), failed=True)).finish_reason == pb.FINISH_REASON_ERROR


def test_decode_request_with_a_handle_needs_the_first_token() -> None:
    msg = codec.decode_request_to_proto(codec.DecodeRequest(REQUEST, 11, HANDLE))
    msg.ClearField("first_token")
    with pytest.raises(ValueError, match="^a KV handle needs first_token$"):
        codec.decode_request_from_proto(msg)


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 64])
def test_a_handle_whose_lease_secret_is_not_32_bytes_is_refused(size: int) -> None:
    """Wherever a handle is read from a peer: the gateway (PrefillResponse) and the decode
    worker (DecodeRequest)."""
    message = f"^handle.lease_secret must be 32 bytes, got {size}$"
    decode = codec.decode_request_to_proto(codec.DecodeRequest(REQUEST, 11, HANDLE))
    decode.handle.lease_secret = bytes(size)
    with pytest.raises(ValueError, match=message):
        codec.decode_request_from_proto(decode)
    prefill = codec.prefill_result_to_proto(codec.PrefillResult(11, None, None, HANDLE, 0, 0.0, 0.0))
    prefill.handle.lease_secret = bytes(size)
    with pytest.raises(ValueError, match=message):
        codec.prefill_result_from_proto(prefill)


def test_health_drain_abort_and_kv_transfer_messages_round_trip() -> None:
    report = codec.HealthReport("d0", WorkerRole.DECODE, LAYOUT, 10, 12, 1, 2, True, 3)
    msg = codec.health_to_proto(report)
    assert (msg.role, msg.layout_fingerprint, msg.layout) == (
        pb.WORKER_ROLE_DECODE,
        LAYOUT.fingerprint,
        LAYOUT.describe(),
    )
    assert codec.health_from_proto(msg) == report
    status = codec.DrainStatus(False, 1, 2, 3)
    assert codec.drain_status_from_proto(codec.drain_status_to_proto(status)) == status
    assert codec.abort_request_from_proto(codec.abort_request_to_proto("r9")) == "r9"
    assert codec.abort_response_from_proto(codec.abort_response_to_proto(True)) is True
    pull = kv_codec.PullKVRequest("r1", (4, 5), LAYOUT.describe(), 1 << 20, SECRET, (2**64 - 1, 9))
    assert kv_codec.pull_kv_request_from_bytes(kv_codec.pull_kv_request_to_bytes(pull)) == pull
    send = kv_codec.SendKVRequest("r1", (4, 5), LAYOUT.describe(), "127.0.0.1:9", "pair-1", 7, SECRET, (3, 8))
    assert kv_codec.send_kv_request_from_bytes(kv_codec.send_kv_request_to_bytes(send)) == send
    for unhashed in (dataclasses.replace(pull, block_hashes=(1,)), dataclasses.replace(send, block_hashes=(1, 2, 3))):
        raw = (
            kv_codec.pull_kv_request_to_bytes(unhashed)
            if isinstance(unhashed, kv_codec.PullKVRequest)
            else kv_codec.send_kv_request_to_bytes(unhashed)
        )
        decode = (
            kv_codec.pull_kv_request_from_bytes
            if isinstance(unhashed, kv_codec.PullKVRequest)
            else kv_codec.send_kv_request_from_bytes
        )
        with pytest.raises(ValueError, match=f"^{len(unhashed.block_hashes)} block hashes for 2 block ids$"):
            decode(raw)
    result = kv_codec.SendKVResult(4096, 2**64 - 1)
    assert kv_codec.send_kv_result_from_bytes(kv_codec.send_kv_result_to_bytes(result)) == result
    assert kv_codec.KV_TRANSFER_SERVICE == "tandem.v1.KVTransfer"  # the gateway calls ReleaseKV by this name
    release = kv_codec.ReleaseKVRequest("r1", SECRET)
    assert kv_codec.release_kv_request_from_bytes(kv_codec.release_kv_request_to_bytes(release)) == release
    for message in (pull, send, release):  # the secret stays out of logs
        assert repr(SECRET) not in repr(message) and "lease_secret" not in repr(message)
    assert kv_codec.release_kv_response_from_bytes(kv_codec.release_kv_response_to_bytes(False)) is False


@pytest.mark.parametrize("priority", [0, -3, 7, MIN_PRIORITY, MAX_PRIORITY])
def test_priority_round_trips(priority: int) -> None:
    request = Request("r1", (1, 2, 3), SamplingParams(), None, priority)
    msg = codec.request_to_proto(request)
    assert msg.priority == priority
    assert codec.request_from_proto(msg) == request
    call = codec.DecodeRequest(request, 11, HANDLE)
    assert codec.decode_request_from_proto(codec.decode_request_to_proto(call)).request.priority == priority


@pytest.mark.parametrize("priority", [MIN_PRIORITY - 1, MAX_PRIORITY + 1, -(2**63)])
def test_out_of_range_priority_from_a_peer_is_refused(priority: int) -> None:
    msg = codec.request_to_proto(REQUEST)
    msg.priority = priority
    with pytest.raises(ValueError) as err:
        codec.request_from_proto(msg)
    assert str(err.value) == f"request.priority must be in [-2147483648, 2147483647], got {priority}"
    with pytest.raises(ValueError, match=r"^request.priority must be in"):
        codec.prefill_request_from_proto(pb.PrefillRequest(request=msg))


@pytest.mark.parametrize("priority", [1.5, "1", True, None, 2**31])
def test_request_priority_must_be_an_int_in_range(priority: object) -> None:
    with pytest.raises(ValueError, match=r"^priority must be (an integer|in \[-2147483648, 2147483647\]), got "):
        Request("r1", (1,), SamplingParams(), None, priority)  # type: ignore[arg-type]
    assert Request("r1", (1,), SamplingParams()).priority == 0
