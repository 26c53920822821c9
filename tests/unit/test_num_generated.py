"""`Request.num_generated` (a migration's replay: its trailing tokens are output already sent):
validation, the split into prompt and generated tokens, and the codec both ways (prefill,
decode and the multiplexed decode stream carry it; a peer's out-of-range value is refused)."""

from __future__ import annotations

import pytest

from tandem.common import codec, mux_codec
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import Request, SamplingParams

REPLAY = Request("r1.m1", (1, 2, 3, 40, 41), SamplingParams(max_tokens=8, presence_penalty=1.0), "salt", 2, 2)


def test_num_generated_splits_the_prompt() -> None:
    assert (REPLAY.original_prompt_token_ids, REPLAY.generated_token_ids) == ((1, 2, 3), (40, 41))
    fresh = Request("r1", (1, 2, 3), SamplingParams())
    assert (fresh.num_generated, fresh.original_prompt_token_ids, fresh.generated_token_ids) == (0, (1, 2, 3), ())


@pytest.mark.parametrize("n", [-1, 3, 4, 1.0, True, None])
def test_num_generated_must_leave_a_prompt_token(n: object) -> None:
    with pytest.raises(ValueError) as err:
        Request("r1", (1, 2, 3), SamplingParams(), num_generated=n)  # type: ignore[arg-type]
    assert str(err.value) == f"num_generated must be an integer in [0, 3) (fewer than the 3 prompt tokens), got {n!r}"


def test_num_generated_round_trips() -> None:
    msg = codec.request_to_proto(REPLAY)
    assert msg.num_generated == 2
    assert codec.request_from_proto(msg) == REPLAY
    assert codec.prefill_request_from_proto(codec.prefill_request_to_proto(REPLAY)) == REPLAY
    call = codec.DecodeRequest(REPLAY, 11)
    assert codec.decode_request_from_proto(codec.decode_request_to_proto(call)) == call
    submit = mux_codec.MuxSubmit(call, "s" * 43)
    assert mux_codec.mux_client_message_from_proto(mux_codec.mux_submit_to_proto(submit)) == submit


@pytest.mark.parametrize("n", [5, 6, 2**32 - 1])
def test_num_generated_from_a_peer_must_be_less_than_the_prompt(n: int) -> None:
    msg = codec.request_to_proto(REPLAY)
    msg.num_generated = n
    with pytest.raises(ValueError) as err:
        codec.request_from_proto(msg)
    assert str(err.value) == f"request.num_generated ({n}) must be less than the prompt's 5 tokens"
    with pytest.raises(ValueError, match=r"^request.num_generated \(\d+\) must be less than"):
        codec.prefill_request_from_proto(pb.PrefillRequest(request=msg))
    with pytest.raises(mux_codec.MuxMessageError) as mux_err:
        bad = mux_codec.mux_submit_to_proto(mux_codec.MuxSubmit(codec.DecodeRequest(REPLAY, 11)))
        bad.submit.call.request.num_generated = n
        mux_codec.mux_client_message_from_proto(bad)
    assert (mux_err.value.request_id, str(mux_err.value)) == (
        "r1.m1",
        f"request.num_generated ({n}) must be less than the prompt's 5 tokens",
    )
