"""Request ownership on the internal plane: who may abort a request, and who may touch a lease.

Only the caller that submitted a request may `Abort` it, and only a holder of a KV handle may
pull or release its lease. The cluster token (`x-tandem-token`) says that a caller belongs to
the cluster; it does not say which requests are its own.

Requests. The caller that submits a request to a worker (`Prefill`, `Decode`: the gateway) draws
an owner secret per request (`new_owner_secret`) and sends it in the gRPC metadata key
`x-tandem-owner`; the worker keeps it with the request while the submitting call is live
(`tandem.worker.owners`). An `Abort` acts only if it carries the same secret (compared in
constant time). An abort with no secret, a wrong one, or an unknown id gets the same answer
(NOT_FOUND, the same message, no effect), so it tells a caller nothing about which ids exist.
A request submitted without a secret cannot be aborted by any `Abort` call: its submitter ends
it by cancelling its own call, which is what the gateway does.

Why a secret next to the id rather than unguessable, worker-assigned request ids: a request id
is public by design. The gateway chooses it before routing, it is the same on the prefill and
the decode worker, it names the request in logs, traces and KV events, and the client sees it
in the response. A value that is logged cannot be a capability. The owner secret travels only
in metadata, from the submitter to the worker, and is never logged, traced or returned.

Leases. The prefill worker draws a secret for each lease (`LEASE_SECRET_BYTES`, in
`tandem.common.kv_handle`) and puts it in the KV handle only; PullKV, SendKV and ReleaseKV must
present it (`tandem.kvtransfer.leases`). The gateway, which received the handle from `Prefill`,
releases a lease it will not use with ReleaseKV and that secret; the decode worker, which holds
the handle, pulls and releases with it.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Iterable

OWNER_METADATA_KEY = "x-tandem-owner"
OWNER_SECRET_BYTES = 32  # random bytes behind a secret from `new_owner_secret` (43 characters)
_OWNER_SECRET = re.compile(r"^[A-Za-z0-9_-]{32,128}$")  # what a worker accepts


def new_owner_secret() -> str:
    """A fresh owner secret for one request (URL-safe base64 of OWNER_SECRET_BYTES random bytes)."""
    return secrets.token_urlsafe(OWNER_SECRET_BYTES)


def owner_metadata(secret: str) -> tuple[str, str]:
    """The gRPC metadata pair that marks a call as the request's owner."""
    return (OWNER_METADATA_KEY, secret)


def owner_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The owner secret a call carries, or None if it carries none. ValueError if it carries a
    malformed one or several (the message never repeats the value)."""
    values = [value for key, value in metadata or () if key == OWNER_METADATA_KEY]
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"{OWNER_METADATA_KEY} appears {len(values)} times")
    value = values[0]
    if not isinstance(value, str) or not _OWNER_SECRET.match(value):
        raise ValueError(f"{OWNER_METADATA_KEY} must be 32 to 128 URL-safe base64 characters")
    return value


def same_owner(recorded: str | None, presented: str | None) -> bool:
    """Whether `presented` is the recorded owner secret; False if either is missing. Compared in
    constant time."""
    if recorded is None or presented is None:
        return False
    return hmac.compare_digest(recorded.encode(), presented.encode())
