"""Mid-stream migration's pure part (gateway/migration.py): which failures move a choice, the
exact replay request, the bound, and `resumable` stitching attempts into one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from tandem.common.request import FinishReason, Request, SamplingParams
from tandem.common.workers import draining_details
from tandem.gateway.errors import service_unavailable
from tandem.gateway.metrics import GatewayMetrics, MigrationReason
from tandem.gateway.migration import DecodeFailure, Resume, StreamError, failure_reason, resumable
from tandem.gateway.pipeline import Delta

PARAMS = SamplingParams(max_tokens=10, temperature=0.7, top_k=5, seed=11, stop_token_ids=(3,), logprobs=2)
REQUEST = Request("cmpl-1-0", (5, 6, 7), PARAMS, "tenant")


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "details", "reason"),
    [
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", MigrationReason.WORKER_FAILED),
        (grpc.StatusCode.UNAVAILABLE, "worker decode-1 is draining: drain deadline passed", MigrationReason.DRAINING),
        # what a worker sends (one definition of the contract: tandem.common.workers)
        (grpc.StatusCode.UNAVAILABLE, draining_details("decode-1"), MigrationReason.DRAINING),
        (grpc.StatusCode.UNAVAILABLE, draining_details("decode-1", "deadline"), MigrationReason.DRAINING),
        (grpc.StatusCode.CANCELLED, "Cancelled", MigrationReason.WORKER_FAILED),
        (grpc.StatusCode.INTERNAL, "boom", MigrationReason.WORKER_FAILED),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "inbox full", MigrationReason.WORKER_FAILED),
        (grpc.StatusCode.INVALID_ARGUMENT, "prompt too long", None),
        (grpc.StatusCode.FAILED_PRECONDITION, "layout mismatch", None),
    ],
)
def test_failure_reason(code: grpc.StatusCode, details: str, reason: MigrationReason | None) -> None:
    assert failure_reason(_rpc_error(code, details)) is reason


def test_replay_is_prompt_plus_sent_tokens_counted_as_generated() -> None:
    resume = Resume(REQUEST, max_migrations=2)
    resume.sent(Delta((20,), (), None))
    resume.sent(Delta((21, 22), (), None))
    replay = resume.resume(DecodeFailure("gone", "decode-0", MigrationReason.WORKER_FAILED))
    assert replay == Request("cmpl-1-0.m1", (5, 6, 7, 20, 21, 22), PARAMS, "tenant", num_generated=3)
    assert (replay.original_prompt_token_ids, replay.generated_token_ids) == ((5, 6, 7), (20, 21, 22))
    assert (resume.exclude, resume.num_migrations, resume.resumed) == (frozenset({"decode-0"}), 1, True)
    resume.sent(Delta((23,), (), None))
    second = resume.resume(DecodeFailure("stalled", "decode-1", MigrationReason.STALLED))
    assert (second.request_id, second.prompt_token_ids, second.num_generated, second.sampling) == (
        "cmpl-1-0.m2",
        (5, 6, 7, 20, 21, 22, 23),
        4,
        PARAMS,
    )
    assert resume.exclude == frozenset({"decode-0", "decode-1"})
    with pytest.raises(StreamError, match=r"^late \(not resumed: 2 migrations is the bound\)$"):
        resume.resume(DecodeFailure("late", "decode-2", MigrationReason.DRAINING))
    assert resume.num_migrations == 2


def test_not_resumed_without_sent_tokens_for_a_refusal_or_with_nothing_left() -> None:
    failure = DecodeFailure("gone", "decode-0", MigrationReason.WORKER_FAILED)
    with pytest.raises(DecodeFailure) as nothing_sent:
        Resume(REQUEST, 2).resume(failure)
    assert nothing_sent.value is failure
    refused = Resume(REQUEST, 2)
    refused.sent(Delta((20,), (), None))
    with pytest.raises(DecodeFailure, match="^refused$"):
        refused.resume(DecodeFailure("refused", "decode-0", None))
    spent = Resume(REQUEST, 2)
    spent.sent(Delta(tuple(range(20, 30)), (), None))
    with pytest.raises(DecodeFailure, match="^gone$"):
        spent.resume(failure)
    assert (refused.num_migrations, spent.num_migrations) == (0, 0)


def test_replay_keeps_min_tokens_and_drops_prompt_logprobs() -> None:
    params = SamplingParams(max_tokens=10, min_tokens=6, presence_penalty=0.5, prompt_logprobs=1)
    resume = Resume(Request("cmpl-2-0", (5, 6, 7), params), max_migrations=1)
    resume.sent(Delta((20, 21), (), None))
    replay = resume.resume(DecodeFailure("gone", "decode-0", MigrationReason.WORKER_FAILED))
    assert replay == Request(
        "cmpl-2-0.m1",
        (5, 6, 7, 20, 21),
        SamplingParams(max_tokens=10, min_tokens=6, presence_penalty=0.5),
        num_generated=2,
    )


def _metric(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model_name": "m", **labels})
    return 0.0 if value is None else value


def _run(attempts: dict[str, list[Delta | BaseException]], max_migrations: int) -> tuple[list, list[str], Resume]:
    """Drive `resumable` over scripted attempts (by request id); returns what came out (deltas,
    then the exception if one ended it) and the request ids attempted."""
    metrics = GatewayMetrics("m")
    resume = Resume(REQUEST, max_migrations)
    seen: list[str] = []

    async def attempt(request: Request) -> AsyncIterator[Delta]:
        seen.append(request.request_id)
        for item in attempts[request.request_id]:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def main() -> list:
        out: list = []
        try:
            async for delta in resumable(attempt, resume, metrics):
                out.append(delta)
        except Exception as exc:
            out.append(exc)
        return out

    out = asyncio.run(main())
    out.append(
        (
            _metric(metrics, "tandem_migrations_total", reason="worker_failed"),
            _metric(metrics, "tandem_migrations_total", reason="stalled"),
            _metric(metrics, "tandem_migration_replayed_tokens_total"),
        )
    )
    return out, seen, resume


def test_resumable_stitches_attempts_and_counts_migrations() -> None:
    out, seen, resume = _run(
        {
            "cmpl-1-0": [Delta((20,), (), None, cached_tokens=2), DecodeFailure("x", "d0", MigrationReason.STALLED)],
            "cmpl-1-0.m1": [Delta((21,), (), None, cached_tokens=3), Delta((22,), (), FinishReason.STOP)],
        },
        max_migrations=1,
    )
    assert out == [
        Delta((20,), (), None, cached_tokens=2),
        Delta((21,), (), None, cached_tokens=0),  # usage counts the prompt's cache hit once
        Delta((22,), (), FinishReason.STOP),
        (0.0, 1.0, 4.0),  # one stalled migration replaying 3 prompt + 1 sent tokens
    ]
    assert seen == ["cmpl-1-0", "cmpl-1-0.m1"]
    assert resume.sent_token_ids == [20, 21, 22]


def test_resumable_ends_with_stream_error_when_the_replay_cannot_start_or_the_bound_is_spent() -> None:
    out, seen, _ = _run(
        {
            "cmpl-1-0": [Delta((20,), (), None), DecodeFailure("x", "d0", MigrationReason.WORKER_FAILED)],
            "cmpl-1-0.m1": [service_unavailable("no worker can take the request: none left", 1)],
        },
        max_migrations=2,
    )
    assert [type(o) for o in out[:2]] == [Delta, StreamError]
    assert str(out[1]) == "resuming on another decode worker failed: no worker can take the request: none left"
    assert out[2] == (1.0, 0.0, 4.0)
    assert seen == ["cmpl-1-0", "cmpl-1-0.m1"]

    out, seen, _ = _run(
        {"cmpl-1-0": [Delta((20,), (), None), DecodeFailure("broke", "d0", MigrationReason.WORKER_FAILED)]},
        max_migrations=0,
    )
    assert str(out[1]) == "broke (not resumed: 0 migrations is the bound)"
    assert (out[2], seen) == ((0.0, 0.0, 0.0), ["cmpl-1-0"])


def test_an_error_before_any_output_is_raised_as_it_is() -> None:
    refusal = service_unavailable("no worker can take the request: none", 1)
    out, seen, _ = _run({"cmpl-1-0": [refusal]}, max_migrations=2)
    assert out[0] is refusal and seen == ["cmpl-1-0"]
