"""The owners of the requests live on this worker: who may `Abort` them.

Lifecycle (the rules are in `tandem.common.ownership`):
1. A submitting handler (`Prefill`, `Decode`) calls `claim(request_id, context)` once it has
   parsed the request, before the engine sees it. The owner secret the call carries in
   `x-tandem-owner` is recorded; a malformed one ends the call with INVALID_ARGUMENT.
2. `Abort` asks `owns(request_id, context)`: True only if the call carries the recorded secret.
3. The record goes when the submitting call ends, however it ends (gRPC's done callback).

First claim wins: while a call holds the record of an id, a second call with the same id
(which the engine refuses as a duplicate anyway) records nothing, so it can never displace
the owner, nor gain the right to abort the first call's request.

Asyncio thread only (handlers and gRPC's done callbacks run there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc

from tandem.common.ownership import owner_from_metadata, same_owner


@dataclass(frozen=True, eq=False)  # identity: two calls with the same secret are two claims
class _Claim:
    secret: str | None = field(repr=False)


class RequestOwners:
    def __init__(self) -> None:
        self._claims: dict[str, _Claim] = {}

    async def claim(self, request_id: str, context: grpc.aio.ServicerContext) -> None:
        """Record the calling submitter as the owner of `request_id` until its call ends."""
        try:
            secret = owner_from_metadata(context.invocation_metadata())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request_id in self._claims:
            return
        claim = _Claim(secret)
        self._claims[request_id] = claim

        def forget(_: Any) -> None:
            if self._claims.get(request_id) is claim:
                del self._claims[request_id]

        context.add_done_callback(forget)

    def owns(self, request_id: str, context: grpc.aio.ServicerContext) -> bool:
        """Whether the calling `Abort` carries the owner secret recorded for `request_id`.
        False for an unknown id, a request submitted without a secret, or a missing, wrong or
        malformed one: the caller cannot tell these apart."""
        claim = self._claims.get(request_id)
        try:
            presented = owner_from_metadata(context.invocation_metadata())
        except ValueError:
            return False
        return same_owner(claim.secret if claim is not None else None, presented)

    def __len__(self) -> int:
        return len(self._claims)
