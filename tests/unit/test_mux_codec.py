"""The codec of the multiplexed decode stream (Worker.DecodeStream): round trips and the
checks on what a peer sends."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tandem.common import codec, mux_codec
from tandem.common.request import FinishReason, Request, SamplingParams


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
