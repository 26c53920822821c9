"""Redis URLs: where processes read one besides their flags, and how one is shown.

A Redis URL may carry a password (`redis://:PASSWORD@host:6379/0`, `redis://user:PASSWORD@...`,
or `?password=...`) and ask for TLS (`rediss://`); redis-py reads all of it natively, so every
client is built from the URL as given (`redis.Redis.from_url`). Since it may hold a secret, a
URL travels to child processes in their environment (`TANDEM_REDIS_URL`), never on a command
line (any local user sees those in `ps`), and is shown only through `redact()`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDIS_URL_ENV = "TANDEM_REDIS_URL"  # read when `--redis` is not given
REDACTED = "***"


def redact(url: str) -> str:
    """`url` with its password (userinfo or `password=` query parameter) replaced by ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return REDACTED  # not a URL we can take apart: show nothing of it
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{hostinfo}"
    query = parts.query
    if "password" in (key.lower() for key, _ in parse_qsl(query, keep_blank_values=True)):
        query = urlencode(
            [(k, REDACTED if k.lower() == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)],
            safe="*",
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def with_password(url: str, password: str) -> str:
    """`url` (no userinfo) with `password` put in: `redis://:PASSWORD@host:port/db`."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError("the URL already has userinfo")
    return urlunsplit((parts.scheme, f":{password}@{parts.netloc}", parts.path, parts.query, parts.fragment))
