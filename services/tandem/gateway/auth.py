"""API-key authentication for the gateway (DESIGN.md section 8).

Who calls it: the gateway, once per request, with the raw `Authorization` header value. The
result is a *key id*, never the key itself: the id goes into Redis key names (rate-limit
buckets, `tandem:{cluster}:ratelimit:{key_id}:...`) and into logs, so it must not reveal the
secret, and it must be the same on every gateway replica (no per-process salt).

- Auth disabled (no keys configured): every request is accepted as `ANONYMOUS_KEY_ID`, whatever
  its header says.
- Auth enabled: the header must be `Bearer <key>` (scheme case-insensitive, surrounding
  whitespace ignored). Otherwise `AuthError(AuthFailure.MISSING)`, as OpenAI does for a
  missing header or a non-Bearer scheme ("You didn't provide an API key"). A Bearer key that
  is not configured gives `AuthError(AuthFailure.INVALID)`. The gateway maps both to 401.

The key id is `key-` + the first 16 hex digits (64 bits) of the key's SHA-256. The presented
key is hashed once and its digest compared with every configured key's digest using
`hmac.compare_digest`, always over all keys, so the time taken does not depend on which key
matched, nor on how long a common prefix the guess shares with a real key.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable

ANONYMOUS_KEY_ID = "anonymous"
KEY_ID_PREFIX = "key-"
KEY_ID_HEX_DIGITS = 16
BEARER_SCHEME = "bearer"


class AuthFailure(str, enum.Enum):
    MISSING = "missing"  # no Authorization header, empty, or not a Bearer credential
    INVALID = "invalid"  # a Bearer key that is not one of the configured keys


class AuthError(Exception):
    """The request is not authenticated; `reason` says why (both map to HTTP 401)."""

    def __init__(self, reason: AuthFailure) -> None:
        super().__init__(f"authentication failed: {reason.value} API key")
        self.reason = reason


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_id_of(key: str) -> str:
    """The stable, non-secret id of `key`: `key-` + 16 hex digits of its SHA-256."""
    return KEY_ID_PREFIX + _digest(key).hex()[:KEY_ID_HEX_DIGITS]


class APIKeys:
    """The set of accepted API keys. Immutable after construction; safe to share."""

    def __init__(self, keys: Iterable[str]) -> None:
        """`keys`: the accepted keys (duplicates are ignored). Empty: authentication disabled.

        Raises ValueError for a key that is not a non-empty string without whitespace (it
        could never be presented in a Bearer header), or if two keys share a key id.
        """
        entries: dict[bytes, str] = {}
        for key in keys:
            if not isinstance(key, str) or not key or any(ch.isspace() for ch in key):
                raise ValueError("every API key must be a non-empty string without whitespace")
            entries[_digest(key)] = key_id_of(key)
        if len(set(entries.values())) != len(entries):
            raise ValueError("two API keys share a key id (SHA-256 prefix); replace one of them")
        self._entries: tuple[tuple[bytes, str], ...] = tuple(entries.items())

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, authorization: str | None) -> str:
        """Authenticate one request from its `Authorization` header value; returns its key id.

        Returns `ANONYMOUS_KEY_ID` when authentication is disabled. Raises `AuthError`.
        """
        if not self._entries:
            return ANONYMOUS_KEY_ID
        parts = (authorization or "").split(None, 1)
        if len(parts) != 2 or parts[0].lower() != BEARER_SCHEME:
            raise AuthError(AuthFailure.MISSING)
        presented = _digest(parts[1].strip())
        matched: str | None = None
        for digest, key_id in self._entries:  # no early exit: always compare with every key
            if hmac.compare_digest(presented, digest):
                matched = key_id
        if matched is None:
            raise AuthError(AuthFailure.INVALID)
        return matched
