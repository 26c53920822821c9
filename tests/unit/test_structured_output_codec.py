"""`StructuredOutput` on the wire: it round-trips, and a peer's oversize spec or unknown kind
is refused with a message naming the field."""

from __future__ import annotations

import pytest

from tandem.common import codec
from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import Request, SamplingParams, StructuredOutput


@pytest.mark.parametrize(
    "so",
    [
        None,
        StructuredOutput("json_schema", '{"type":"object"}'),
        StructuredOutput("json_object"),
        StructuredOutput("regex", "[a-z]+"),
        StructuredOutput("choice", '["a","b"]'),
        StructuredOutput("grammar", 'root ::= "x"'),
    ],
)
def test_structured_output_round_trips(so: StructuredOutput | None) -> None:
    request = Request("r1", (1, 2, 3), SamplingParams(max_tokens=4, structured_output=so))
    wire = codec.request_to_proto(request).SerializeToString()
    assert codec.request_from_proto(pb.Request.FromString(wire)) == request


def _sampling(kind: str, spec: str) -> pb.SamplingParams:
    msg = codec.sampling_to_proto(SamplingParams(max_tokens=4))
    msg.structured_output.kind = kind
    msg.structured_output.spec = spec
    return msg


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        (
            "json_schema",
            "x" * (codec.MAX_STRUCTURED_SPEC_CHARS + 1),
            f"sampling.structured_output.spec: at most {codec.MAX_STRUCTURED_SPEC_CHARS} characters",
        ),
        (
            "lark",
            "start: x",
            "sampling.structured_output: structured output kind must be one of "
            "('json_schema', 'json_object', 'regex', 'choice', 'grammar'), got 'lark'",
        ),
        ("regex", "", "sampling.structured_output: structured output of kind 'regex' needs a non-empty spec"),
        ("json_object", "{}", "sampling.structured_output: structured output of kind 'json_object' takes no spec"),
    ],
)
def test_a_bad_structured_output_from_a_peer_is_refused(kind: str, spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        codec.sampling_from_proto(_sampling(kind, spec))
    assert str(info.value) == message


def test_the_largest_spec_is_accepted() -> None:
    spec = "a" * codec.MAX_STRUCTURED_SPEC_CHARS
    assert codec.sampling_from_proto(_sampling("regex", spec)).structured_output == StructuredOutput("regex", spec)
