"""The sampling controls, prompt logprobs and prompt-only prefills cross the wire unchanged,
and a peer's bad values are refused with the field named."""

from __future__ import annotations

import pytest

from tandem.common import codec
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import FinishReason, PromptLogprobs, SamplingParams, TokenLogprob

CONTROLS = SamplingParams(
    max_tokens=9,
    presence_penalty=-0.5,
    frequency_penalty=1.25,
    repetition_penalty=1.5,
    logit_bias=((7, -100.0), (3, 2.5)),
    min_tokens=4,
    bad_words_token_ids=((5,), (6, 8, 9)),
    prompt_logprobs=2,
)
PROMPT_LPS = PromptLogprobs(
    (TokenLogprob(4, -1.5, ((4, -1.5), (2, -2.0))), TokenLogprob(9, -7.25, ((1, -0.5), (2, -1.0)))), (1, 17)
)


@pytest.mark.parametrize("params", [CONTROLS, SamplingParams(), SamplingParams(max_tokens=0, prompt_logprobs=0)])
def test_sampling_controls_round_trip(params: SamplingParams) -> None:
    assert codec.sampling_from_proto(codec.sampling_to_proto(params)) == params


def test_prompt_only_prefill_and_prompt_logprobs_round_trip() -> None:
    result = codec.PrefillResult(None, None, FinishReason.LENGTH, None, 0, 0.5, 0.25, PROMPT_LPS)
    assert codec.prefill_result_from_proto(codec.prefill_result_to_proto(result)) == result
    with_token = codec.PrefillResult(0, None, FinishReason.STOP, None, 3, 0.0, 0.0)
    assert codec.prefill_result_from_proto(codec.prefill_result_to_proto(with_token)) == with_token
    delta = codec.DecodeDelta((5,), finish_reason=FinishReason.LENGTH, prompt_logprobs=PROMPT_LPS)
    assert codec.decode_delta_from_proto(codec.decode_delta_to_proto(delta)) == delta


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.logit_bias_values.pop(), "sampling.logit_bias_token_ids and logit_bias_values differ in length"),
        (
            lambda m: m.bad_words.add(token_ids=[-1]),
            "sampling: logit_bias and bad_words token ids must be in [0, 2147483648)",
        ),
        (lambda m: m.bad_words.add(token_ids=[0] * (1 << 14)), "sampling.bad_words: at most 16384 token ids in all"),
        (lambda m: setattr(m, "repetition_penalty", -1.0), "repetition_penalty must be a finite number > 0, got -1.0"),
        (lambda m: setattr(m, "min_tokens", 10), "min_tokens (10) must be at most max_tokens (9)"),
    ],
)
def test_bad_controls_from_a_peer_are_refused(mutate, message: str) -> None:
    msg = codec.sampling_to_proto(CONTROLS)
    mutate(msg)
    with pytest.raises(ValueError) as info:
        codec.sampling_from_proto(msg)
    assert str(info.value) == message


def test_a_prompt_only_prefill_must_end_with_length() -> None:
    msg = pb.PrefillResponse(prompt_only=True, finish_reason=pb.FINISH_REASON_STOP)
    with pytest.raises(ValueError, match="a prompt-only prefill ends with finish reason LENGTH and no handle"):
        codec.prefill_result_from_proto(msg)
