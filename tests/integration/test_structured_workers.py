"""Structured output through a real prefill + decode pair (issue 19): the prefill worker
samples the first token under the grammar, the decode worker resumes the matcher from it,
and the output equals a colocated engine's, greedy and seeded. A bad grammar is
INVALID_ARGUMENT naming the problem on both roles, and the workers keep serving."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import jsonschema
import pytest

from tandem.common.pb import tandem_pb2 as pb
from tandem.common.request import StructuredOutput
from tandem.engine import Engine, SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tests.conftest import random_prompts
from tests.integration.workers import STOP_TIMEOUT_S, decode_stream, disaggregated, prefill, start_worker
from tests.json_schemas import generate_schemas


def schema_output(schema: dict) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, redis_server):
    common = ("--redis", redis_server.url, "--kv-transport", "grpc", "--heartbeat-ttl-s", "2")
    p = start_worker("prefill", tiny_model_dir, *common, worker_id="p-structured")
    d = start_worker("decode", tiny_model_dir, *common, worker_id="d-structured")
    yield p, d
    assert d.stop(STOP_TIMEOUT_S) == 0
    assert p.stop(STOP_TIMEOUT_S) == 0


def test_disaggregated_output_equals_colocated_greedy_and_seeded(pair, tiny_model_dir: Path) -> None:
    p, d = pair
    reference = Engine.from_pretrained(tiny_model_dir, num_blocks=256)
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    schemas = generate_schemas(seed=5, count=8)
    prompts = random_prompts([3, 17, 20, 33, 40, 9, 64, 12], reference.model_config.vocab_size, seed=4)
    params = [
        SamplingParams(max_tokens=300, temperature=t, seed=100 + i, structured_output=schema_output(s))
        for i, (s, t) in enumerate(zip(schemas, [0.0, 1.0] * 4))
    ]
    expected = [list(o.token_ids) for o in reference.generate(prompts, params)]
    for i, (prompt, sampling, schema) in enumerate(zip(prompts, params, schemas)):
        tokens, deltas = disaggregated(p, d, f"structured-{i}", prompt, sampling)
        assert tokens == expected[i], f"request {i}"
        assert deltas[-1].finish_reason == pb.FINISH_REASON_STOP
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)


def test_a_bad_grammar_is_invalid_argument_on_both_roles(pair) -> None:
    p, d = pair
    bad = SamplingParams(max_tokens=8, structured_output=StructuredOutput("json_schema", '{"type": "foo"}'))
    message = 'invalid structured output (json_schema): Unsupported type "foo"'
    with pytest.raises(grpc.RpcError) as info:
        prefill(p, "bad-p", [1, 2, 3], bad)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    with pytest.raises(grpc.RpcError) as info:
        list(decode_stream(d, "bad-d", [1, 2, 3], bad))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    good = SamplingParams(max_tokens=30, temperature=0.0, structured_output=StructuredOutput("regex", "[0-9]{4}"))
    tokens, deltas = disaggregated(p, d, "good-after-bad", [1, 2, 3], good)
    assert deltas[-1].finish_reason == pb.FINISH_REASON_STOP and len(tokens) >= 2
