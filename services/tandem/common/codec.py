"""The wire: every protobuf message of proto/tandem.proto to and from frozen dataclasses.

This is the only module that builds or reads a protobuf object (tests/unit/test_codec.py
checks it); servers and clients pass messages straight to and from these functions. Every
`*_from_proto` applied to what a peer sent validates it here, with bounded sizes; a problem
raises ValueError with a message naming the field (servers map it to INVALID_ARGUMENT).

Sections: the request; the Worker service (Prefill, Decode, Abort, Health, Drain); the KV
handle; the KVTransfer service (PullKV, ReleaseKV, SendKV) and its chunks, which have a
zero-copy framing of their own (see "KV chunks" below).
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from tandem.common.kv_handle import MAX_HANDLE_BLOCKS, KVHandle
from tandem.common.layout import KVLayout
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import FinishReason, Request, SamplingParams, TokenLogprob
from tandem.common.workers import WorkerRole

MAX_PROMPT_TOKENS = 1 << 20
MAX_REQUEST_ID_CHARS = 256
_TOKEN_ID_LIMIT = 1 << 31

FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
PB_TO_FINISH: dict[int, FinishReason | None] = {v: k for k, v in FINISH_TO_PB.items()}


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )
    if p.top_k is not None:
        msg.top_k = p.top_k
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    if len(msg.stop_token_ids) > 1024:
        raise ValueError("sampling.stop_token_ids: at most 1024 entries")
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        top_p=msg.top_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def request_to_proto(r: Request) -> pb.Request:
    return pb.Request(
        request_id=r.request_id,
        prompt_token_ids=list(r.prompt_token_ids),
        sampling=sampling_to_proto(r.sampling),
        cache_salt=r.cache_salt or "",
    )


def request_from_proto(msg: pb.Request) -> Request:
    if not msg.request_id or len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request.request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
    if not msg.HasField("sampling"):
        raise ValueError("request.sampling is required")
    if not 0 < len(msg.prompt_token_ids) <= MAX_PROMPT_TOKENS:
        raise ValueError(f"request.prompt_token_ids must have 1 to {MAX_PROMPT_TOKENS} tokens")
    prompt = tuple(msg.prompt_token_ids)
    if min(prompt) < 0 or max(prompt) >= _TOKEN_ID_LIMIT:
        raise ValueError("request.prompt_token_ids holds an out-of-range token id")
    if len(msg.cache_salt) > 256:
        raise ValueError("request.cache_salt is too long")
    return Request(msg.request_id, prompt, sampling_from_proto(msg.sampling), msg.cache_salt or None)


def logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=[t for t, _ in lp.top],
        top_logprobs=[v for _, v in lp.top],
    )


def logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    if len(msg.top_token_ids) != len(msg.top_logprobs):
        raise ValueError("logprob.top_token_ids and top_logprobs differ in length")
    return TokenLogprob(msg.token_id, msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)))


# ---- Worker service -------------------------------------------------------------------------
_ROLE_TO_PB = {WorkerRole.PREFILL: pb.WORKER_ROLE_PREFILL, WorkerRole.DECODE: pb.WORKER_ROLE_DECODE}
_PB_TO_ROLE = {v: k for k, v in _ROLE_TO_PB.items()}


@dataclass(frozen=True)
class PrefillResult:
    """What `Prefill` answers: the first token, and a KV handle unless that token ended the
    request. `queue_s` and `compute_s` are the TTFT stages on the prefill worker."""

    first_token: int
    first_logprob: TokenLogprob | None
    finish_reason: FinishReason | None  # set when the first token already ends the request
    handle: KVHandle | None  # absent when finished
    num_cached_tokens: int
    queue_s: float
    compute_s: float


@dataclass(frozen=True)
class DecodeRequest:
    """What `Decode` receives: the request, and the first token and KV handle from a prefill
    worker, or neither (the decode worker then prefills locally)."""

    request: Request
    first_token: int | None = None
    handle: KVHandle | None = None


@dataclass(frozen=True)
class DecodeDelta:
    """One message of a `Decode` stream: the new tokens since the previous one. `failed` means
    the decode worker's step failed. The fields after it are set on the first message only."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    failed: bool = False
    num_cached_tokens: int = 0  # prompt tokens found in the decode worker's cache
    num_pulled_blocks: int = 0
    recomputed: bool = False  # the hand-off failed and the decode worker recomputed the prompt
    transfer_s: float = 0.0  # the KV hand-off (0 without a handle)
    admit_s: float = 0.0  # end of the hand-off (or arrival) until first scheduled


@dataclass(frozen=True)
class HealthReport:
    """What `Health` answers: the worker, its layout and its load."""

    worker_id: str
    role: WorkerRole
    layout: KVLayout
    free_blocks: int
    total_blocks: int
    waiting: int
    running: int
    draining: bool
    held_leases: int


@dataclass(frozen=True)
class DrainStatus:
    """What `Drain` answers: `idle` once no request (a KV pull included) or lease is left."""

    idle: bool
    waiting: int
    running: int
    held_leases: int


def prefill_request_to_proto(request: Request) -> pb.PrefillRequest:
    return pb.PrefillRequest(request=request_to_proto(request))


def prefill_request_from_proto(msg: pb.PrefillRequest) -> Request:
    return request_from_proto(msg.request)


def prefill_result_to_proto(result: PrefillResult) -> pb.PrefillResponse:
    msg = pb.PrefillResponse(
        first_token=result.first_token,
        finish_reason=FINISH_TO_PB[result.finish_reason],
        num_cached_tokens=result.num_cached_tokens,
        queue_s=result.queue_s,
        compute_s=result.compute_s,
    )
    if result.first_logprob is not None:
        msg.first_logprob.CopyFrom(logprob_to_proto(result.first_logprob))
    if result.handle is not None:
        msg.handle.CopyFrom(handle_to_proto(result.handle))
    return msg


def prefill_result_from_proto(msg: pb.PrefillResponse) -> PrefillResult:
    return PrefillResult(
        first_token=msg.first_token,
        first_logprob=logprob_from_proto(msg.first_logprob) if msg.HasField("first_logprob") else None,
        finish_reason=_finish_from_proto(msg.finish_reason),
        handle=handle_from_proto(msg.handle) if msg.HasField("handle") else None,
        num_cached_tokens=msg.num_cached_tokens,
        queue_s=msg.queue_s,
        compute_s=msg.compute_s,
    )


def decode_request_to_proto(call: DecodeRequest) -> pb.DecodeRequest:
    msg = pb.DecodeRequest(request=request_to_proto(call.request))
    if call.first_token is not None:
        msg.first_token = call.first_token
    if call.handle is not None:
        msg.handle.CopyFrom(handle_to_proto(call.handle))
    return msg


def decode_request_from_proto(msg: pb.DecodeRequest) -> DecodeRequest:
    request = request_from_proto(msg.request)
    handle = handle_from_proto(msg.handle) if msg.HasField("handle") else None
    first_token = msg.first_token if msg.HasField("first_token") else None
    if handle is not None and first_token is None:
        raise ValueError("a KV handle needs first_token")
    return DecodeRequest(request, first_token, handle)


def decode_delta_to_proto(delta: DecodeDelta) -> pb.DecodeDelta:
    return pb.DecodeDelta(
        token_ids=delta.token_ids,
        logprobs=[logprob_to_proto(lp) for lp in delta.logprobs],
        finish_reason=pb.FINISH_REASON_ERROR if delta.failed else FINISH_TO_PB[delta.finish_reason],
        num_cached_tokens=delta.num_cached_tokens,
        num_pulled_blocks=delta.num_pulled_blocks,
        recomputed=delta.recomputed,
        transfer_s=delta.transfer_s,
        admit_s=delta.admit_s,
    )


def decode_delta_from_proto(msg: pb.DecodeDelta) -> DecodeDelta:
    failed = msg.finish_reason == pb.FINISH_REASON_ERROR
    return DecodeDelta(
        token_ids=tuple(msg.token_ids),
        logprobs=tuple(logprob_from_proto(lp) for lp in msg.logprobs),
        finish_reason=None if failed else _finish_from_proto(msg.finish_reason),
        failed=failed,
        num_cached_tokens=msg.num_cached_tokens,
        num_pulled_blocks=msg.num_pulled_blocks,
        recomputed=msg.recomputed,
        transfer_s=msg.transfer_s,
        admit_s=msg.admit_s,
    )


def abort_request_to_proto(request_id: str) -> pb.AbortRequest:
    return pb.AbortRequest(request_id=request_id)


def abort_request_from_proto(msg: pb.AbortRequest) -> str:
    return msg.request_id


def abort_response_to_proto(found: bool) -> pb.AbortResponse:
    return pb.AbortResponse(found=found)


def abort_response_from_proto(msg: pb.AbortResponse) -> bool:
    return msg.found


def health_request_to_proto() -> pb.HealthRequest:
    return pb.HealthRequest()


def health_to_proto(report: HealthReport) -> pb.HealthResponse:
    return pb.HealthResponse(
        worker_id=report.worker_id,
        role=_ROLE_TO_PB[report.role],
        layout_fingerprint=report.layout.fingerprint,
        layout=report.layout.describe(),
        free_blocks=report.free_blocks,
        total_blocks=report.total_blocks,
        waiting=report.waiting,
        running=report.running,
        draining=report.draining,
        held_leases=report.held_leases,
    )


def health_from_proto(msg: pb.HealthResponse) -> HealthReport:
    if msg.role not in _PB_TO_ROLE:
        raise ValueError(f"health.role: unknown worker role {msg.role}")
    layout = KVLayout.parse(msg.layout)
    if layout.fingerprint != msg.layout_fingerprint:
        raise ValueError("health.layout_fingerprint is not the hash of health.layout")
    return HealthReport(
        worker_id=msg.worker_id,
        role=_PB_TO_ROLE[msg.role],
        layout=layout,
        free_blocks=msg.free_blocks,
        total_blocks=msg.total_blocks,
        waiting=msg.waiting,
        running=msg.running,
        draining=msg.draining,
        held_leases=msg.held_leases,
    )


def drain_request_to_proto() -> pb.DrainRequest:
    return pb.DrainRequest()


def drain_status_to_proto(status: DrainStatus) -> pb.DrainResponse:
    return pb.DrainResponse(
        idle=status.idle, waiting=status.waiting, running=status.running, held_leases=status.held_leases
    )


def drain_status_from_proto(msg: pb.DrainResponse) -> DrainStatus:
    return DrainStatus(msg.idle, msg.waiting, msg.running, msg.held_leases)


def _finish_from_proto(value: int) -> FinishReason | None:
    if value not in PB_TO_FINISH:
        raise ValueError(f"finish_reason: unknown value {value}")
    return PB_TO_FINISH[value]


# ---- KV handle ------------------------------------------------------------------------------
def handle_to_proto(handle: KVHandle) -> pb.KVHandle:
    """P's gRPC edge: the handle that goes into a PrefillResponse."""
    return pb.KVHandle(
        request_id=handle.request_id,
        source_worker_id=handle.source_worker_id,
        source_address=handle.source_address,
        block_ids=handle.block_ids,
        num_tokens=handle.num_tokens,
        layout=handle.layout.describe(),
        block_hashes=handle.block_hashes,
        lease_deadline_unix_s=handle.lease_deadline_unix_s,
    )


def handle_from_proto(msg: pb.KVHandle) -> KVHandle:
    """Check what a peer sent before anything uses it (ValueError names it). The layout is
    parsed here, once; comparing it with the receiver's is `KVHandle.check`."""
    if not msg.request_id or not msg.source_address:
        raise ValueError("KV handle needs a request_id and a source_address")
    if len(msg.block_ids) > MAX_HANDLE_BLOCKS or len(msg.block_hashes) > len(msg.block_ids):
        raise ValueError(f"KV handle names {len(msg.block_ids)} blocks and {len(msg.block_hashes)} block hashes")
    if len(set(msg.block_ids)) != len(msg.block_ids):
        raise ValueError("KV handle repeats a block id")
    try:
        layout = KVLayout.parse(msg.layout)
    except ValueError as exc:
        raise ValueError(f"handle.layout: {exc}") from None
    return KVHandle(
        request_id=msg.request_id,
        source_worker_id=msg.source_worker_id,
        source_address=msg.source_address,
        block_ids=tuple(msg.block_ids),
        num_tokens=msg.num_tokens,
        layout=layout,
        block_hashes=tuple(msg.block_hashes),
        lease_deadline_unix_s=msg.lease_deadline_unix_s,
    )


# ---- KVTransfer service ---------------------------------------------------------------------
# Its servicers are registered as generic handlers, so these take and give bytes: the
# servicer's methods see only the dataclasses.
@dataclass(frozen=True)
class PullKVRequest:
    """A receiver asks for `block_ids` (of the lease of `request_id`), in chunks of at most
    `max_chunk_bytes`. `layout` is the receiver's `KVLayout.describe()`, parsed and compared
    by the source."""

    request_id: str
    block_ids: tuple[int, ...]
    layout: str
    max_chunk_bytes: int


@dataclass(frozen=True)
class SendKVRequest:
    """The torch transport's control call (proto/tandem.proto, `SendKVRequest`)."""

    request_id: str
    block_ids: tuple[int, ...]
    layout: str
    store_address: str  # host:port of the receiver's TCPStore
    pair_id: str
    tag: int  # first message tag of this transfer within the pair


@dataclass(frozen=True)
class SendKVResult:
    size_bytes: int
    checksum: int  # xxh64 of the packed buffer


def pull_kv_request_to_bytes(request: PullKVRequest) -> bytes:
    return pb.PullKVRequest(
        request_id=request.request_id,
        block_ids=request.block_ids,
        layout=request.layout,
        max_chunk_bytes=request.max_chunk_bytes,
    ).SerializeToString()


def pull_kv_request_from_bytes(raw: bytes) -> PullKVRequest:
    msg = pb.PullKVRequest.FromString(raw)
    return PullKVRequest(msg.request_id, tuple(msg.block_ids), msg.layout, msg.max_chunk_bytes)


def release_kv_request_to_bytes(request_id: str) -> bytes:
    return pb.ReleaseKVRequest(request_id=request_id).SerializeToString()


def release_kv_request_from_bytes(raw: bytes) -> str:
    return pb.ReleaseKVRequest.FromString(raw).request_id


def release_kv_response_to_bytes(released: bool) -> bytes:
    return pb.ReleaseKVResponse(released=released).SerializeToString()


def release_kv_response_from_bytes(raw: bytes) -> bool:
    return pb.ReleaseKVResponse.FromString(raw).released


def send_kv_request_to_bytes(request: SendKVRequest) -> bytes:
    return pb.SendKVRequest(
        request_id=request.request_id,
        block_ids=request.block_ids,
        layout=request.layout,
        store_address=request.store_address,
        pair_id=request.pair_id,
        tag=request.tag,
    ).SerializeToString()


def send_kv_request_from_bytes(raw: bytes) -> SendKVRequest:
    msg = pb.SendKVRequest.FromString(raw)
    return SendKVRequest(msg.request_id, tuple(msg.block_ids), msg.layout, msg.store_address, msg.pair_id, msg.tag)


def send_kv_result_to_bytes(result: SendKVResult) -> bytes:
    return pb.SendKVResponse(size_bytes=result.size_bytes, checksum=result.checksum).SerializeToString()


def send_kv_result_from_bytes(raw: bytes) -> SendKVResult:
    msg = pb.SendKVResponse.FromString(raw)
    return SendKVResult(msg.size_bytes, msg.checksum)


# ---- KV chunks ------------------------------------------------------------------------------
# `KVChunk` carries up to 4 MiB of packed KV. Building the message with protobuf costs three
# copies of the payload (bytes(), the message, SerializeToString) and reading `.data` one more;
# at gigabytes per second those copies are the transfer. So the source writes the exact
# protobuf wire encoding itself, header fields via protobuf and the `data` field (number 2,
# length-delimited) joined straight from the packed buffer, and the receiver finds the `data`
# field in the raw message and reads it through a memoryview. Both sides stay wire-compatible
# with the generated classes (protobuf accepts fields in any order); tests check it both ways.
_DATA_FIELD = 2
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


class ChunkDecodeError(ValueError):
    """A chunk is not valid protobuf wire format, or repeats its data field."""


@dataclass(frozen=True)
class ChunkView:
    """One received chunk; `data` is a view into the message bytes (valid while they live)."""

    offset_bytes: int
    total_bytes: int
    checksum: int
    dtype: str
    shape: tuple[int, ...]
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_chunk(
    pieces: list[memoryview], offset_bytes: int, total_bytes: int, dtype: str, shape: tuple[int, ...]
) -> bytes:
    """Source side (a worker thread): one KVChunk in wire format whose data is the
    concatenation of `pieces`, with its xxh64. The pieces are copied once, into the result."""
    hasher = xxhash.xxh64()
    for piece in pieces:
        hasher.update(piece)
    header = pb.KVChunk(
        offset_bytes=offset_bytes,
        checksum=hasher.intdigest(),
        total_bytes=total_bytes,
        dtype=dtype,
        shape=shape,
    ).SerializeToString()
    key = _varint(_DATA_FIELD << 3 | _WIRE_LEN)
    return b"".join((header, key, _varint(sum(len(p) for p in pieces)), *pieces))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ChunkDecodeError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def decode_chunk(raw: bytes) -> ChunkView:
    """Receiver side: parse one KVChunk message without copying its payload."""
    buf = memoryview(raw)
    pos = 0
    data: tuple[int, int] | None = None
    header_parts: list[memoryview] = []
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire == _WIRE_I64:
            pos += 8
        elif wire == _WIRE_I32:
            pos += 4
        elif wire == _WIRE_LEN:
            length, pos = _read_varint(buf, pos)
            if field == _DATA_FIELD:
                if data is not None:
                    raise ChunkDecodeError("chunk repeats its data field")
                data = (pos, pos + length)
                pos += length
                continue
            pos += length
        else:
            raise ChunkDecodeError(f"unsupported wire type {wire} of field {field}")
        if pos > len(buf):
            raise ChunkDecodeError(f"field {field} runs past the end of the chunk")
        header_parts.append(buf[start:pos])
    if data is None or data[1] > len(buf):
        raise ChunkDecodeError("chunk has no data field, or it runs past the end")
    try:
        header = pb.KVChunk.FromString(b"".join(header_parts))
    except Exception as exc:  # protobuf's DecodeError; its base class varies by backend
        raise ChunkDecodeError(f"chunk header does not parse: {exc}") from None
    return ChunkView(
        offset_bytes=header.offset_bytes,
        total_bytes=header.total_bytes,
        checksum=header.checksum,
        dtype=header.dtype,
        shape=tuple(header.shape),
        data=buf[data[0] : data[1]],
    )
