"""One HTTP request driven in-process through an ASGI app (no server, no lifespan): what the
gateway's unit tests use to reach its endpoints."""

from __future__ import annotations

import asyncio
from typing import Any


def call(
    app: Any, path: str, body: bytes, method: str = "POST", key: str | None = None, root_path: str = ""
) -> tuple[list[dict[str, Any]], BaseException | None]:
    """The messages the app sends for one request, and what it raised (None: nothing)."""
    sent: list[dict[str, Any]] = []
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "query_string": b"",
        "root_path": root_path,
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> BaseException | None:
        try:
            await app(scope, receive, send)
        except Exception as exc:
            return exc
        return None

    return sent, asyncio.run(run())
