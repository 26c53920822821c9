"""The wire of Worker.DecodeStream, the multiplexed decode path (proto/tandem.proto: Mux*):
gateway -> worker `MuxClientMessage` (a submit, a cancel, or a batch of them), worker -> gateway `MuxStep` (every
request's output of one engine step). A submit carries what a `Decode` call does, so it reuses
codec.py's DecodeRequest and DecodeDelta encodings. Like codec.py, every `*_from_proto` of what
a peer sent validates it, with bounded sizes, and raises ValueError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.common.codec import (
    MAX_REQUEST_ID_CHARS,
    DecodeDelta,
    DecodeRequest,
    decode_delta_from_proto,
    decode_request_from_proto,
    decode_request_to_proto,
    fill_decode_delta,
    logprob_to_proto,
)
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import TokenLogprob

MAX_MUX_OUTPUTS = 1 << 16  # outputs in one MuxStep from a peer
MAX_TRACE_CONTEXT_ITEMS = 8  # trace-context entries of one MuxSubmit
MAX_TRACE_CONTEXT_CHARS = 1024  # characters of one trace-context key or value
MAX_STATUS_CODE = 16  # gRPC status codes are 0 (OK) to 16 (UNAUTHENTICATED)
MAX_ERROR_DETAILS_CHARS = 1 << 16
MAX_BATCH_MESSAGES = 256  # submits and cancels in one MuxBatch
MAX_BATCH_BYTES = 1 << 20  # what a sender packs into one MuxBatch (a larger message goes alone)

# One message a client sends on the stream, as built here: senders queue these opaquely.
ClientMessage = pb.MuxClientMessage


@dataclass(frozen=True)
class MuxSubmit:
    """A decode request on the multiplexed stream: what a `Decode` call carries, with the
    owner secret and trace context that such a call sends in its metadata."""

    call: DecodeRequest
    owner_secret: str | None = field(default=None, repr=False)
    trace_context: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MuxOutput:
    """One request's part of a step: its delta, or (`error_code` > 0, a gRPC status code) the
    status its `Decode` call would have ended with."""

    request_id: str
    delta: DecodeDelta | None = None
    error_code: int = 0
    error_details: str = ""


class MuxMessageError(ValueError):
    """A malformed message from the gateway; `request_id` names the request when it can be
    attributed to one (then only that request is refused)."""

    def __init__(self, message: str, request_id: str | None) -> None:
        super().__init__(message)
        self.request_id = request_id


def mux_submit_to_proto(submit: MuxSubmit) -> pb.MuxClientMessage:
    msg = pb.MuxClientMessage()
    msg.submit.call.CopyFrom(decode_request_to_proto(submit.call))
    msg.submit.owner_secret = submit.owner_secret or ""
    msg.submit.trace_context.update(dict(submit.trace_context))
    return msg


def mux_cancel_to_proto(request_id: str) -> pb.MuxClientMessage:
    return pb.MuxClientMessage(cancel=pb.MuxCancel(request_id=request_id))


def mux_batches_to_proto(messages: list[pb.MuxClientMessage]) -> list[pb.MuxClientMessage]:
    """`messages` (submits and cancels, in order) as few messages as the bounds allow: runs of
    at most MAX_BATCH_MESSAGES and MAX_BATCH_BYTES in a `MuxBatch`; a lone one as it is."""
    out: list[pb.MuxClientMessage] = []
    run: list[pb.MuxClientMessage] = []
    run_bytes = 0

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(pb.MuxClientMessage(batch=pb.MuxBatch(messages=run)))
        run.clear()

    for msg in messages:
        size = msg.ByteSize()
        if run and (len(run) == MAX_BATCH_MESSAGES or run_bytes + size > MAX_BATCH_BYTES):
            flush()
            run_bytes = 0
        run.append(msg)
        run_bytes += size
    flush()
    return out


def mux_client_messages(msg: pb.MuxClientMessage) -> list[pb.MuxClientMessage]:
    """The submits and cancels a message from the gateway carries, in order: itself, or its
    batch's. MuxMessageError (naming no request) for a batch in a batch or an oversized one."""
    if msg.WhichOneof("kind") != "batch":
        return [msg]
    messages = list(msg.batch.messages)
    if len(messages) > MAX_BATCH_MESSAGES:
        raise MuxMessageError(f"a MuxBatch holds at most {MAX_BATCH_MESSAGES} messages, got {len(messages)}", None)
    if any(m.WhichOneof("kind") == "batch" for m in messages):
        raise MuxMessageError("a MuxBatch holds submits and cancels, not a batch", None)
    return messages


def mux_client_message_from_proto(msg: pb.MuxClientMessage) -> MuxSubmit | str:
    """A submit, or the id of a request to cancel. MuxMessageError names the request id when
    the message can be attributed to one."""
    kind = msg.WhichOneof("kind")
    if kind == "cancel":
        rid = msg.cancel.request_id
        if not 0 < len(rid) <= MAX_REQUEST_ID_CHARS:
            raise MuxMessageError(f"cancel.request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters", None)
        return rid
    if kind != "submit":
        raise MuxMessageError("a MuxClientMessage holds a submit or a cancel", None)
    sub = msg.submit
    rid = sub.call.request.request_id
    named = rid if 0 < len(rid) <= MAX_REQUEST_ID_CHARS else None
    trace = tuple(sorted(sub.trace_context.items()))
    if len(trace) > MAX_TRACE_CONTEXT_ITEMS or any(
        len(k) > MAX_TRACE_CONTEXT_CHARS or len(v) > MAX_TRACE_CONTEXT_CHARS for k, v in trace
    ):
        raise MuxMessageError(
            f"submit.trace_context: at most {MAX_TRACE_CONTEXT_ITEMS} entries of {MAX_TRACE_CONTEXT_CHARS} characters",
            named,
        )
    try:
        call = decode_request_from_proto(sub.call)
    except ValueError as exc:
        raise MuxMessageError(str(exc), named) from None
    return MuxSubmit(call, sub.owner_secret or None, trace)


# A request's delta in the stream's steady state: (request id, new token ids, their
# logprobs), no finish and none of the first delta's fields. The worker sends most of a step's
# outputs in this form: it skips building a DecodeDelta and a MuxOutput per request and step.
# On the wire it is the DecodeDelta `DecodeDelta(token_ids, logprobs)` would give.
MuxTokens = tuple[str, tuple[int, ...], tuple[TokenLogprob, ...]]


def mux_step_to_proto(outputs: list[MuxOutput | MuxTokens]) -> pb.MuxStep:
    """One step's outputs, each delta written into its entry in place (`fill_decode_delta`)."""
    msg = pb.MuxStep()
    add = msg.outputs.add
    for out in outputs:
        if isinstance(out, tuple):  # MuxTokens
            rid, token_ids, logprobs = out
            delta = add(request_id=rid).delta
            delta.token_ids.extend(token_ids)
            if logprobs:
                delta.logprobs.extend(logprob_to_proto(lp) for lp in logprobs)
        elif out.delta is None:
            add(request_id=out.request_id, error_code=out.error_code, error_details=out.error_details)
        else:
            fill_decode_delta(add(request_id=out.request_id).delta, out.delta)
    return msg


def mux_step_from_proto(msg: pb.MuxStep) -> list[MuxOutput]:
    if len(msg.outputs) > MAX_MUX_OUTPUTS:
        raise ValueError(f"a MuxStep holds at most {MAX_MUX_OUTPUTS} outputs, got {len(msg.outputs)}")
    outputs = []
    for entry in msg.outputs:
        if not 0 < len(entry.request_id) <= MAX_REQUEST_ID_CHARS:
            raise ValueError(f"output.request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
        if not 0 <= entry.error_code <= MAX_STATUS_CODE:
            raise ValueError(f"output.error_code: unknown status code {entry.error_code}")
        if len(entry.error_details) > MAX_ERROR_DETAILS_CHARS:
            raise ValueError(f"output.error_details: at most {MAX_ERROR_DETAILS_CHARS} characters")
        if (entry.error_code == 0) != entry.HasField("delta"):
            raise ValueError("an output holds either a delta or an error code")
        delta = _delta_from_proto(entry.delta) if entry.HasField("delta") else None
        outputs.append(MuxOutput(entry.request_id, delta, entry.error_code, entry.error_details))
    return outputs


_TOKEN_IDS = pb.DecodeDelta.DESCRIPTOR.fields_by_name["token_ids"]


def _delta_from_proto(msg: pb.DecodeDelta) -> DecodeDelta:
    """`decode_delta_from_proto`, with a short path for the steady state's entry (`MuxTokens`):
    a delta whose only set field is its token ids, read without visiting the others."""
    fields = msg.ListFields()
    if len(fields) == 1 and fields[0][0] is _TOKEN_IDS:
        return DecodeDelta(tuple(fields[0][1]))
    return decode_delta_from_proto(msg)
