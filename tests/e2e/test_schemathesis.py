"""Schemathesis against the gateway's own API document (issue 16, deliverable 4).

A gateway on the session's real cluster serves `/openapi.json`; schemathesis generates
requests from it, valid and invalid (every generation mode), with a fixed seed and a bounded
number of examples per operation, and checks every response: never a 5xx
(`not_a_server_error`), and every documented response matches its schema
(`response_schema_conformance`). Generation is kept cheap by a short context (`--max-model-len`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance

from tandem.launcher.processes import ChildProcess
from tests.e2e.cluster import GATEWAY_STOP_TIMEOUT_S, Cluster, gateway_metric

MAX_EXAMPLES = 60  # per operation and generation mode: about 15 s on 2 cores
EXPECTED_OPERATIONS = {
    "GET /health",
    "GET /ready",
    "GET /metrics",
    "GET /v1/models",
    "POST /tokenize",
    "POST /detokenize",
    "POST /v1/completions",
    "POST /v1/chat/completions",
}


@pytest.fixture(scope="module")
def fuzzed_gateway(cluster: Cluster) -> Iterator[ChildProcess]:
    g = cluster.gateway("--max-model-len", "48")
    try:
        yield g
    finally:
        g.stop(GATEWAY_STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def gateway_schema(fuzzed_gateway: ChildProcess):
    schema = schemathesis.openapi.from_url(fuzzed_gateway.address + "/openapi.json")
    return schema


def test_the_document_names_every_operation_and_body(gateway_schema) -> None:
    raw = gateway_schema.raw_schema
    assert {f"{method.upper()} {path}" for path, ops in raw["paths"].items() for method in ops} == EXPECTED_OPERATIONS
    for path, model in (
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/tokenize", "TokenizeRequest"),
        ("/detokenize", "DetokenizeRequest"),
    ):
        body = raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    top_k = raw["components"]["schemas"]["CompletionRequest"]["properties"]["top_k"]
    assert top_k["anyOf"][0] == {"type": "integer", "minimum": -1, "maximum": 2**32 - 1}


def test_no_server_error_and_conformant_responses(gateway_schema) -> None:
    """Every operation, positive and negative examples; failures are collected so one run names
    them all. (Driven with hypothesis directly: schemathesis' pytest loader does not support this
    pytest.)"""
    failures: list[str] = []
    for result in gateway_schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: the run stays bounded
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Case) -> None:
                case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

            try:
                run()
            except Unsatisfiable:  # an operation without parameters has no invalid input
                assert mode is GenerationMode.NEGATIVE and operation.method == "get", operation.path
            except (Failure, FailureGroup) as exc:  # a check failed (one, or a group)
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    assert failures == []


def test_the_gateway_counted_no_500(fuzzed_gateway: ChildProcess, cluster: Cluster) -> None:
    """After the run: no request ended 500 (the counter that an unexpected exception bumps), and
    the pools drained."""
    assert gateway_metric(fuzzed_gateway, "tandem_requests_total", status="500") == 0
    cluster.assert_drained(timeout_s=10.0)
