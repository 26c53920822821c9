"""The codec of the multiplexed decode stream (Worker.DecodeStream): round trips and the
checks on what a peer sends."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tandem.common import codec, mux_codec
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import FinishReason, Request, SamplingParams, TokenLogprob


def test_mux_messages_round_trip_and_are_validated() -> None:
    request = Request("m1", (1, 2, 3), SamplingParams(max_tokens=4))
    submit = mux_codec.MuxSubmit(codec.DecodeRequest(request), "s" * 43, (("traceparent", "00-ab-cd-01"),))
    assert mux_codec.mux_client_message_from_proto(mux_codec.mux_submit_to_proto(submit)) == submit
    assert mux_codec.mux_client_message_from_proto(mux_codec.mux_cancel_to_proto("m1")) == "m1"
    outputs = [
        mux_codec.MuxOutput("m1", codec.DecodeDelta((5, 6), finish_reason=FinishReason.LENGTH)),
        mux_codec.MuxOutput("m2", None, 14, "worker d0 is draining"),
    ]
    assert mux_codec.mux_step_from_proto(mux_codec.mux_step_to_proto(outputs)) == outputs
    bad = mux_codec.mux_submit_to_proto(
        mux_codec.MuxSubmit(codec.DecodeRequest(dataclasses.replace(request, request_id="x")))
    )
    del bad.submit.call.request.prompt_token_ids[:]
    with pytest.raises(mux_codec.MuxMessageError) as err:
        mux_codec.mux_client_message_from_proto(bad)
    assert (err.value.request_id, str(err.value)) == ("x", "request.prompt_token_ids must have 1 to 1048576 tokens")
    with pytest.raises(mux_codec.MuxMessageError) as err:
        mux_codec.mux_client_message_from_proto(mux_codec.mux_cancel_to_proto(""))
    assert err.value.request_id is None
    for entry, message in [
        (mux_codec.MuxOutput("m1", None, 0, ""), "an output holds either a delta or an error code"),
        (mux_codec.MuxOutput("m1", None, 17, "?"), "output.error_code: unknown status code 17"),
        (mux_codec.MuxOutput("", codec.DecodeDelta((1,))), "output.request_id must have 1 to 256 characters"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            mux_codec.mux_step_from_proto(mux_codec.mux_step_to_proto([entry]))


def test_a_steady_state_tokens_entry_encodes_as_its_decode_delta() -> None:
    lp = (TokenLogprob(7, -0.25, ((7, -0.25), (9, -2.0))),)
    lean: list[mux_codec.MuxOutput | mux_codec.MuxTokens] = [("m1", (7,), lp), ("m2", (8, 9), ())]
    full: list[mux_codec.MuxOutput | mux_codec.MuxTokens] = [
        mux_codec.MuxOutput("m1", codec.DecodeDelta((7,), lp)),
        mux_codec.MuxOutput("m2", codec.DecodeDelta((8, 9))),
    ]
    wire = mux_codec.mux_step_to_proto(lean).SerializeToString()
    assert wire == mux_codec.mux_step_to_proto(full).SerializeToString()
    assert mux_codec.mux_step_from_proto(pb.MuxStep.FromString(wire)) == full
    mixed = [full[0], ("m1", (10,), ()), mux_codec.MuxOutput("m1", None, 14, "worker d0 is draining")]
    assert mux_codec.mux_step_from_proto(mux_codec.mux_step_to_proto(mixed)) == [
        full[0],
        mux_codec.MuxOutput("m1", codec.DecodeDelta((10,))),
        mixed[2],
    ]  # in order


def test_queued_messages_are_packed_in_order_within_the_bounds(monkeypatch) -> None:
    def submit(rid: str, num_tokens: int = 3) -> object:
        request = Request(rid, tuple(range(1, num_tokens + 1)), SamplingParams(max_tokens=4))
        return mux_codec.mux_submit_to_proto(mux_codec.MuxSubmit(codec.DecodeRequest(request)))

    lone = submit("a")
    assert mux_codec.mux_batches_to_proto([lone]) == [lone]  # a lone message goes as it is
    assert mux_codec.mux_client_messages(lone) == [lone]
    queued = [submit("a"), mux_codec.mux_cancel_to_proto("a"), submit("b")]
    [packed] = mux_codec.mux_batches_to_proto(queued)
    assert packed.WhichOneof("kind") == "batch"
    unpacked = mux_codec.mux_client_messages(packed)
    assert [mux_codec.mux_client_message_from_proto(m) for m in unpacked] == [
        mux_codec.mux_client_message_from_proto(m) for m in queued
    ]  # the submit, then its cancel, then the next submit
    monkeypatch.setattr(mux_codec, "MAX_BATCH_MESSAGES", 2)
    assert [mux_codec.mux_client_messages(m) for m in mux_codec.mux_batches_to_proto(queued)] == [
        queued[:2],
        [queued[2]],
    ]
    monkeypatch.setattr(mux_codec, "MAX_BATCH_MESSAGES", 256)
    big = submit("big", 400_000)  # over MAX_BATCH_BYTES: alone, between the runs around it
    runs = mux_codec.mux_batches_to_proto([queued[0], big, queued[1], queued[2]])
    assert [mux_codec.mux_client_messages(m) for m in runs] == [[queued[0]], [big], queued[1:]]


def test_a_batch_in_a_batch_or_an_oversized_one_is_refused() -> None:
    cancel = mux_codec.mux_cancel_to_proto("a")
    inner = mux_codec.mux_batches_to_proto([cancel, cancel])[0]
    nested = mux_codec.mux_batches_to_proto([cancel, inner])[0]
    with pytest.raises(mux_codec.MuxMessageError, match="a MuxBatch holds submits and cancels, not a batch") as err:
        mux_codec.mux_client_messages(nested)
    assert err.value.request_id is None  # the stream's fault: it ends INVALID_ARGUMENT
    oversized = pb.MuxClientMessage(batch=pb.MuxBatch(messages=[cancel] * 257))
    with pytest.raises(mux_codec.MuxMessageError, match="a MuxBatch holds at most 256 messages, got 257"):
        mux_codec.mux_client_messages(oversized)


@pytest.mark.parametrize(
    "delta",
    [
        codec.DecodeDelta((5,)),  # the steady state: token ids only (the short path)
        codec.DecodeDelta((5, 6, 7)),
        codec.DecodeDelta(()),  # nothing set at all
        codec.DecodeDelta((5,), (TokenLogprob(5, -0.5, ((5, -0.5),)),)),
        codec.DecodeDelta((5,), finish_reason=FinishReason.STOP),
        codec.DecodeDelta((), failed=True),
        codec.DecodeDelta((5,), num_cached_tokens=16, num_pulled_blocks=2, transfer_s=0.25, admit_s=0.5),
        codec.DecodeDelta((5,), recomputed=True),
    ],
)
def test_every_kind_of_delta_reads_back_as_it_was_written(delta: codec.DecodeDelta) -> None:
    """The reader's short path for a token-ids-only delta gives what the full reader gives."""
    entry = pb.MuxStep.FromString(mux_codec.mux_step_to_proto([mux_codec.MuxOutput("m1", delta)]).SerializeToString())
    assert mux_codec.mux_step_from_proto(entry) == [mux_codec.MuxOutput("m1", delta)]
    assert mux_codec.mux_step_from_proto(entry)[0].delta == codec.decode_delta_from_proto(entry.outputs[0].delta)


def test_an_unknown_finish_reason_is_refused_even_beside_token_ids() -> None:
    msg = mux_codec.mux_step_to_proto([mux_codec.MuxOutput("m1", codec.DecodeDelta((5,)))])
    msg.outputs[0].delta.finish_reason = 99
    with pytest.raises(ValueError, match="finish_reason: unknown value 99"):
        mux_codec.mux_step_from_proto(msg)
