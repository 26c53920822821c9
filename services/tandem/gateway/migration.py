"""Mid-stream migration: one choice resumed on another decode worker (DESIGN.md section 2.7).

Lifecycle of one choice (one `Pipeline.generate`):
1. `Resume(request, max_migrations)` starts with the client's request. Every delta the
   pipeline yields passes through `sent(delta)`, which records its tokens: they are what the
   client has.
2. A decode stream that fails raises `DecodeFailure`: the worker, and a `MigrationReason`
   (`failure_reason`: the worker died or broke the stream, stalled past the decode idle
   timeout, or ended it at its drain deadline), or None when the worker refused the request
   itself (never migrated).
3. `resume(failure)` returns the replay: the original prompt plus every token sent, with
   `num_generated` set to their number (`Request.num_generated`: the worker counts them as
   output, not prompt), the original sampling parameters (`max_tokens` and `min_tokens`
   unchanged; no prompt logprobs) and cache salt, and a fresh request id (`{id}.m{k}`), so
   that it never meets what a worker still holds for an earlier attempt (a prefill lease, a
   stalled decoder's sequence). The failed worker joins
   `exclude`. It raises `StreamError` when nothing was sent (the pre-first-token rules
   apply), when the failure is not migratable, or when `max_migrations` is spent.
4. The pipeline routes the replay as a new request with its own block hashes (the prefix
   index prefers a worker that holds the blocks; otherwise they are recomputed, by a prefill
   worker when the uncached part is long), never to an excluded worker. `sent` strips the
   replay's cached tokens (usage counts the prompt once) and never re-sends a logprob.

Why the output is the same as an unbroken run: the tokens sent were not EOS or stop tokens
(the stream would have finished); the worker's sequence has the original prompt and the sent
tokens as its output, so `max_tokens`, `min_tokens`, presence/frequency penalties and bad
words count them exactly as the failed worker did, and the grammar matcher of a structured
request replays them before the next token is masked; the engine's length cap (prompt +
max_tokens, at most the model's length) is unchanged, and a seeded sampler draws from (seed,
absolute position), which the replay keeps. Greedy decoding is as exact as recompute after
preemption. Stop strings are matched above the pipeline (generation.py) on the one stream, so
their state carries over. Block hashes and the KV hand-off cover every token of the replay,
so a worker that holds the sent tokens' blocks serves them from its prefix cache.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, ClassVar, Protocol, TypeVar

import grpc

from tandem.common.request import Request
from tandem.common.workers import DRAINING_DETAILS
from tandem.gateway.errors import OpenAIError
from tandem.gateway.metrics import GatewayMetrics, MigrationReason

log = logging.getLogger(__name__)

# Status codes of a worker's failure, not of the request's (a refused request is not moved).
WORKER_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


class StreamError(RuntimeError):
    """The generation failed after tokens were already delivered."""


class DecodeFailure(StreamError):
    """A decode stream failed. `reason` None: the worker refused the request itself."""

    def __init__(self, message: str, worker_id: str, reason: MigrationReason | None) -> None:
        super().__init__(message)
        self.worker_id = worker_id
        self.reason = reason


def failure_reason(exc: grpc.aio.AioRpcError) -> MigrationReason | None:
    """Why a decode stream that ended with `exc` may be resumed elsewhere (None: it may not)."""
    code = exc.code()
    if code is grpc.StatusCode.UNAVAILABLE and DRAINING_DETAILS in (exc.details() or ""):
        return MigrationReason.DRAINING
    return MigrationReason.WORKER_FAILED if code in WORKER_FAILURES else None


class _Sent(Protocol):
    """What `Resume` reads of a pipeline delta (a frozen dataclass)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def token_ids(self) -> tuple[int, ...]: ...

    @property
    def cached_tokens(self) -> int: ...


D = TypeVar("D", bound=_Sent)


class Resume:
    """One choice's migration state: the tokens sent, the workers that failed it, the
    migrations done. Owned by one `Pipeline.generate` (the asyncio loop); not shared."""

    def __init__(self, request: Request, max_migrations: int) -> None:
        self.request = request
        self.max_migrations = max_migrations
        self.sent_token_ids: list[int] = []
        self.exclude: frozenset[str] = frozenset()
        self.num_migrations = 0

    @property
    def resumed(self) -> bool:
        return self.num_migrations > 0

    def sent(self, delta: _Sent) -> None:
        self.sent_token_ids.extend(delta.token_ids)

    def resume(self, failure: DecodeFailure) -> Request:
        """The replay of the choice after `failure`; raises StreamError when it cannot be
        resumed (see the module docstring)."""
        if not self.sent_token_ids:
            raise failure
        if failure.reason is None:
            raise failure
        if self.num_migrations >= self.max_migrations:
            raise StreamError(f"{failure} (not resumed: {self.num_migrations} migrations is the bound)") from failure
        original = self.request
        if len(self.sent_token_ids) >= original.sampling.max_tokens:
            raise failure  # the last token came without its finish reason: nothing is left to run
        self.num_migrations += 1
        self.exclude |= {failure.worker_id}
        replay = dataclasses.replace(
            original,
            request_id=f"{original.request_id}.m{self.num_migrations}",
            prompt_token_ids=original.prompt_token_ids + tuple(self.sent_token_ids),
            num_generated=len(self.sent_token_ids),
            # prompt logprobs came with the first attempt
            sampling=dataclasses.replace(original.sampling, prompt_logprobs=None),
        )
        log.warning(
            "resuming %s as %s (%s on %s: %s); replaying %d tokens",
            original.request_id,
            replay.request_id,
            failure.reason.value,
            failure.worker_id,
            failure,
            len(replay.prompt_token_ids),
        )
        return replay


async def resumable(
    attempt: Callable[[Request], AsyncIterator[D]], resume: Resume, metrics: GatewayMetrics
) -> AsyncGenerator[D, None]:
    """Run `attempt(request)` on the choice's request, then on each replay after a failure
    that `resume` accepts; yield every delta once, in order. A replay that fails before its
    first delta (no worker left, a refused prefill) ends the choice with `StreamError`."""
    request = resume.request
    while True:
        try:
            async for delta in attempt(request):
                resume.sent(delta)
                yield dataclasses.replace(delta, cached_tokens=0) if resume.resumed else delta
            return
        except DecodeFailure as failure:
            request = resume.resume(failure)  # raises StreamError when it cannot be resumed
            assert failure.reason is not None
            metrics.migrated(failure.reason, len(request.prompt_token_ids))
        except OpenAIError as exc:
            if not resume.resumed:
                raise
            raise StreamError(f"resuming on another decode worker failed: {exc.message}") from exc
