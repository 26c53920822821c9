"""The gateway process: binds the configured address, serves the app on uvicorn, and prints one
JSON `ready` line on stdout (`{"event": "ready", "address": "http://host:port"}`) once it
listens. SIGTERM or SIGINT stops accepting, gives open requests `GRACEFUL_SHUTDOWN_S`, stops
the scheduler threads and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator

import uvicorn
import uvloop

from tandem.common.gc_heap import freeze_startup_heap
from tandem.gateway.app import create_app
from tandem.gateway.config import GatewayConfig
from tandem.gateway.state import GatewayState

GRACEFUL_SHUTDOWN_S = 5


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would
    die by the signal; a drained gateway exits 0 instead, like the workers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def serve(config: GatewayConfig) -> bool:
    """Serve until a signal; False if the app never started. Refuses to start without the
    cluster token (unless `--insecure-no-auth`): every worker call would be refused."""
    config.plane.require("the gateway")
    state = GatewayState(config)
    app = create_app(state)
    sock = bind(config.host, config.port)
    server = _Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            lifespan="on",
            http="httptools",
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        freeze_startup_heap("gateway")  # its full GC pauses would stall every stream
        sys.stdout.write(json.dumps({"event": "ready", "address": f"http://{shown}:{port}"}) + "\n")
        sys.stdout.flush()
    await task
    sock.close()
    return server.started


def run(config: GatewayConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return 0 if uvloop.run(serve(config)) else 1
