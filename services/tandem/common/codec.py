"""The wire: every protobuf message of proto/tandem.proto to and from frozen dataclasses.

This module, `kv_codec.py` (the KV handle, the KVTransfer service and the KV chunks) and
`mux_codec.py` (the multiplexed decode stream) are the only code that builds or reads a
protobuf object (tests/unit/test_codec.py checks it); servers and clients pass messages
straight to and from these functions. Every `*_from_proto` applied to what a peer sent
validates it here, with bounded sizes; a problem raises ValueError with a message naming the
field (servers map it to INVALID_ARGUMENT).

Sections: the request; the Worker service (Prefill, Decode, Abort, Health, Drain). Its
multiplexed decode stream (DecodeStream) has its own module, `mux_codec.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem.common.kv_codec import handle_from_proto, handle_to_proto
from tandem.common.kv_handle import KVHandle
from tandem.common.layout import KVLayout
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    FinishReason,
    PromptLogprobs,
    Request,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)
from tandem.common.workers import WorkerRole

MAX_PROMPT_TOKENS = 1 << 20
MAX_REQUEST_ID_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_STRUCTURED_SPEC_CHARS = 1 << 20  # a JSON schema, regex, choice list or EBNF grammar
TOKEN_ID_LIMIT = 1 << 31  # token ids from a peer are in [0, TOKEN_ID_LIMIT)
MAX_LOGIT_BIAS = 1 << 16  # logit_bias entries
MAX_BAD_WORD_TOKENS = 1 << 14  # token ids over all bad words

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
    if p.structured_output is not None:
        msg.structured_output.kind = p.structured_output.kind
        msg.structured_output.spec = p.structured_output.spec
    _controls_to_proto(p, msg)
    return msg


def _controls_to_proto(p: SamplingParams, msg: pb.SamplingParams) -> None:
    msg.presence_penalty = p.presence_penalty
    msg.frequency_penalty = p.frequency_penalty
    if p.repetition_penalty != 1.0:
        msg.repetition_penalty = p.repetition_penalty
    msg.logit_bias_token_ids.extend(t for t, _ in p.logit_bias)
    msg.logit_bias_values.extend(b for _, b in p.logit_bias)
    msg.min_tokens = p.min_tokens
    for word in p.bad_words_token_ids:
        msg.bad_words.add(token_ids=word)
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs


def structured_output_from_proto(msg: pb.SamplingParams) -> StructuredOutput | None:
    if not msg.HasField("structured_output"):
        return None
    so = msg.structured_output
    if len(so.spec) > MAX_STRUCTURED_SPEC_CHARS:
        raise ValueError(f"sampling.structured_output.spec: at most {MAX_STRUCTURED_SPEC_CHARS} characters")
    try:
        return StructuredOutput(so.kind, so.spec)
    except ValueError as exc:
        raise ValueError(f"sampling.structured_output: {exc}") from None


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"sampling.stop_token_ids: at most {MAX_STOP_TOKEN_IDS} entries")
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        top_p=msg.top_p,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        structured_output=structured_output_from_proto(msg),
        **_controls_from_proto(msg),
    )


def _controls_from_proto(msg: pb.SamplingParams) -> dict[str, Any]:
    """The sampling controls' fields, with the sizes and token ids checked (SamplingParams
    checks the ranges)."""
    if len(msg.logit_bias_token_ids) != len(msg.logit_bias_values):
        raise ValueError("sampling.logit_bias_token_ids and logit_bias_values differ in length")
    if len(msg.logit_bias_token_ids) > MAX_LOGIT_BIAS:
        raise ValueError(f"sampling.logit_bias: at most {MAX_LOGIT_BIAS} entries")
    words = tuple(tuple(w.token_ids) for w in msg.bad_words)
    if sum(map(len, words)) > MAX_BAD_WORD_TOKENS:
        raise ValueError(f"sampling.bad_words: at most {MAX_BAD_WORD_TOKENS} token ids in all")
    ids = [*msg.logit_bias_token_ids, *(t for w in words for t in w)]
    if any(not 0 <= t < TOKEN_ID_LIMIT for t in ids):
        raise ValueError(f"sampling: logit_bias and bad_words token ids must be in [0, {TOKEN_ID_LIMIT})")
    return {
        "presence_penalty": msg.presence_penalty,
        "frequency_penalty": msg.frequency_penalty,
        "repetition_penalty": msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        "logit_bias": tuple(zip(msg.logit_bias_token_ids, msg.logit_bias_values)),
        "min_tokens": msg.min_tokens,
        "bad_words_token_ids": words,
        "prompt_logprobs": msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
    }


def request_to_proto(r: Request) -> pb.Request:
    return pb.Request(
        request_id=r.request_id,
        prompt_token_ids=list(r.prompt_token_ids),
        sampling=sampling_to_proto(r.sampling),
        cache_salt=r.cache_salt or "",
        priority=r.priority,
        num_generated=r.num_generated,
    )


def request_from_proto(msg: pb.Request) -> Request:
    if not msg.request_id or len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request.request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
    if not msg.HasField("sampling"):
        raise ValueError("request.sampling is required")
    if not 0 < len(msg.prompt_token_ids) <= MAX_PROMPT_TOKENS:
        raise ValueError(f"request.prompt_token_ids must have 1 to {MAX_PROMPT_TOKENS} tokens")
    prompt = tuple(msg.prompt_token_ids)
    if min(prompt) < 0 or max(prompt) >= TOKEN_ID_LIMIT:
        raise ValueError("request.prompt_token_ids holds an out-of-range token id")
    if len(msg.cache_salt) > 256:
        raise ValueError("request.cache_salt is too long")
    if not MIN_PRIORITY <= msg.priority <= MAX_PRIORITY:
        raise ValueError(f"request.priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {msg.priority}")
    if msg.num_generated >= len(prompt):
        raise ValueError(
            f"request.num_generated ({msg.num_generated}) must be less than the prompt's {len(prompt)} tokens"
        )
    sampling = sampling_from_proto(msg.sampling)
    return Request(msg.request_id, prompt, sampling, msg.cache_salt or None, msg.priority, msg.num_generated)


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


def prompt_logprobs_to_proto(p: PromptLogprobs) -> pb.PromptLogprobs:
    return pb.PromptLogprobs(logprobs=[logprob_to_proto(lp) for lp in p.logprobs], ranks=p.ranks)


def prompt_logprobs_from_proto(msg: pb.PromptLogprobs) -> PromptLogprobs:
    return PromptLogprobs(tuple(logprob_from_proto(lp) for lp in msg.logprobs), tuple(msg.ranks))


def finish_from_proto(value: int) -> FinishReason | None:
    """A peer's finish reason; ValueError for a value this version does not know."""
    if value not in PB_TO_FINISH:
        raise ValueError(f"finish_reason: unknown value {value}")
    return PB_TO_FINISH[value]


# ---- Worker service -------------------------------------------------------------------------
_ROLE_TO_PB = {WorkerRole.PREFILL: pb.WORKER_ROLE_PREFILL, WorkerRole.DECODE: pb.WORKER_ROLE_DECODE}
_PB_TO_ROLE = {v: k for k, v in _ROLE_TO_PB.items()}


@dataclass(frozen=True)
class PrefillResult:
    """What `Prefill` answers: the first token, and a KV handle unless that token ended the
    request. `queue_s` and `compute_s` are the TTFT stages on the prefill worker.
    `first_token` is None only for a prompt-only request (`max_tokens=0`, finish reason
    LENGTH); `prompt_logprobs` is set when they were asked for."""

    first_token: int | None
    first_logprob: TokenLogprob | None
    finish_reason: FinishReason | None  # set when the first token already ends the request
    handle: KVHandle | None  # absent when finished
    num_cached_tokens: int
    queue_s: float
    compute_s: float
    prompt_logprobs: PromptLogprobs | None = None


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
    prompt_logprobs: PromptLogprobs | None = None  # a local prefill's, when asked for


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
        first_token=result.first_token or 0,
        prompt_only=result.first_token is None,
        finish_reason=FINISH_TO_PB[result.finish_reason],
        num_cached_tokens=result.num_cached_tokens,
        queue_s=result.queue_s,
        compute_s=result.compute_s,
    )
    if result.first_logprob is not None:
        msg.first_logprob.CopyFrom(logprob_to_proto(result.first_logprob))
    if result.handle is not None:
        msg.handle.CopyFrom(handle_to_proto(result.handle))
    if result.prompt_logprobs is not None:
        msg.prompt_logprobs.CopyFrom(prompt_logprobs_to_proto(result.prompt_logprobs))
    return msg


def prefill_result_from_proto(msg: pb.PrefillResponse) -> PrefillResult:
    if msg.prompt_only and (msg.HasField("handle") or msg.finish_reason != pb.FINISH_REASON_LENGTH):
        raise ValueError("a prompt-only prefill ends with finish reason LENGTH and no handle")
    return PrefillResult(
        first_token=None if msg.prompt_only else msg.first_token,
        first_logprob=logprob_from_proto(msg.first_logprob) if msg.HasField("first_logprob") else None,
        finish_reason=finish_from_proto(msg.finish_reason),
        handle=handle_from_proto(msg.handle) if msg.HasField("handle") else None,
        num_cached_tokens=msg.num_cached_tokens,
        queue_s=msg.queue_s,
        compute_s=msg.compute_s,
        prompt_logprobs=prompt_logprobs_from_proto(msg.prompt_logprobs) if msg.HasField("prompt_logprobs") else None,
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
    msg = pb.DecodeDelta()
    fill_decode_delta(msg, delta)
    return msg


def fill_decode_delta(msg: pb.DecodeDelta, delta: DecodeDelta) -> None:
    """Write `delta` into `msg`, an empty message (such as a new MuxStep entry's `delta`): what
    `decode_delta_to_proto` returns, without building a second message to copy in. Only the
    fields that differ from their defaults are set (proto3 sends no default), so a plain delta
    of the multiplexed stream's steady state costs one call."""
    msg.token_ids.extend(delta.token_ids)
    if delta.logprobs:
        msg.logprobs.extend(logprob_to_proto(lp) for lp in delta.logprobs)
    finish_reason = pb.FINISH_REASON_ERROR if delta.failed else FINISH_TO_PB[delta.finish_reason]
    if finish_reason:
        msg.finish_reason = finish_reason
    if delta.num_cached_tokens:
        msg.num_cached_tokens = delta.num_cached_tokens
    if delta.num_pulled_blocks:
        msg.num_pulled_blocks = delta.num_pulled_blocks
    if delta.recomputed:
        msg.recomputed = True
    if delta.transfer_s:
        msg.transfer_s = delta.transfer_s
    if delta.admit_s:
        msg.admit_s = delta.admit_s
    if delta.prompt_logprobs is not None:
        msg.prompt_logprobs.CopyFrom(prompt_logprobs_to_proto(delta.prompt_logprobs))


def decode_delta_from_proto(msg: pb.DecodeDelta) -> DecodeDelta:
    failed = msg.finish_reason == pb.FINISH_REASON_ERROR
    return DecodeDelta(
        token_ids=tuple(msg.token_ids),
        logprobs=tuple(logprob_from_proto(lp) for lp in msg.logprobs),
        finish_reason=None if failed else finish_from_proto(msg.finish_reason),
        failed=failed,
        num_cached_tokens=msg.num_cached_tokens,
        num_pulled_blocks=msg.num_pulled_blocks,
        recomputed=msg.recomputed,
        transfer_s=msg.transfer_s,
        admit_s=msg.admit_s,
        prompt_logprobs=prompt_logprobs_from_proto(msg.prompt_logprobs) if msg.HasField("prompt_logprobs") else None,
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
