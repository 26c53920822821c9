"""The tcp source's data listener: accepts connections on `bind_host` only, keeps them open
between pulls, and hands a connection to a sender thread each time its next token arrives.

Why keep them: a new loopback connection starts with small windows and buffers, and moves a
64 MiB pull at about half the speed of one that has carried a pull before (the receiver keeps
its connections too: tcp_transport.py). Every pull still presents its own one-time token.

Threads and ownership: one selector thread owns the listening socket and every waiting
connection; a pool of `max_senders` threads serves one pull at a time each. A connection is
either waiting (in the selector) or served (owned by one sender), never both:
1. Accepted, it waits for its first bytes; a new one that sends nothing within
   TOKEN_TIMEOUT_S is closed and counted as refused (`on_refused`).
2. Readable, it goes to a sender: `serve(conn, fresh)` reads the token (a fresh connection)
   or the request (a kept one), sends the pull, and says whether the connection is still in
   step (keep it) or not (close it).
3. Kept, it waits again, up to IDLE_TIMEOUT_S, then is closed quietly (as when the receiver
   closes it first).
At most MAX_CONNECTIONS are open; more are closed at once and counted as refused.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

TOKEN_TIMEOUT_S = 5.0  # a new connection must present its token within this
IDLE_TIMEOUT_S = 120.0  # a kept connection with no pull for this long is closed
MAX_CONNECTIONS = 256  # open data connections (waiting or served)
SWEEP_PERIOD_S = 0.1  # how often waiting connections are checked against their timeouts


@dataclass(frozen=True)
class _Waiting:
    fresh: bool  # no pull yet on this connection
    deadline_s: float  # time.monotonic() when it is closed if nothing arrives


class DataListener:
    """`serve(conn, fresh) -> keep` runs on a sender thread for each arriving pull (`fresh`:
    the connection's first)."""

    def __init__(
        self,
        host: str,
        port: int,
        serve: Callable[[socket.socket, bool], bool],
        max_senders: int,
        on_refused: Callable[[], None],
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family)
        bound_host, bound_port = self._listener.getsockname()[:2]
        self.address = f"[{bound_host}]:{bound_port}" if family == socket.AF_INET6 else f"{bound_host}:{bound_port}"
        self._serve, self._on_refused = serve, on_refused
        self._senders = ThreadPoolExecutor(max_senders, thread_name_prefix="kv-tcp-send")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._kept: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()  # from senders back to waiting
        self._num_open = 0  # selector thread and senders: under _lock
        self._lock = threading.Lock()
        self._closed = False
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="kv-tcp-listen", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._closed:
                for key, _ in self._selector.select(SWEEP_PERIOD_S):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._take_back_kept()
                    else:
                        self._selector.unregister(key.fileobj)
                        self._hand_over(key.fileobj, key.data.fresh)  # type: ignore[arg-type]
                self._sweep()
        finally:
            for key in list(self._selector.get_map().values()):
                if isinstance(key.data, _Waiting):
                    key.fileobj.close()  # type: ignore[union-attr]
            self._selector.close()
            self._listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with self._lock:
            full = self._num_open >= MAX_CONNECTIONS
            if not full:
                self._num_open += 1
        if full:  # a flood of connections never holds unbounded resources
            conn.close()
            self._on_refused()
            return
        self._selector.register(conn, selectors.EVENT_READ, _Waiting(True, time.monotonic() + TOKEN_TIMEOUT_S))

    def _hand_over(self, conn: socket.socket, fresh: bool) -> None:
        try:
            self._senders.submit(self._run, conn, fresh)
        except RuntimeError:  # shut down meanwhile
            self._close(conn)

    def _run(self, conn: socket.socket, fresh: bool) -> None:
        """Sender thread: serve one pull, then keep the connection or close it."""
        keep = False
        try:
            keep = self._serve(conn, fresh)
        finally:
            if keep and not self._closed:
                self._kept.put(conn)
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"\0")
            else:
                self._close(conn)

    def _take_back_kept(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while not self._kept.empty():
            conn = self._kept.get()
            self._selector.register(conn, selectors.EVENT_READ, _Waiting(False, time.monotonic() + IDLE_TIMEOUT_S))

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in list(self._selector.get_map().values()):
            waiting = key.data
            if isinstance(waiting, _Waiting) and waiting.deadline_s <= now:
                self._selector.unregister(key.fileobj)
                self._close(key.fileobj)  # type: ignore[arg-type]
                if waiting.fresh:
                    self._on_refused()

    def _close(self, conn: socket.socket) -> None:
        conn.close()
        with self._lock:
            self._num_open -= 1

    def close(self) -> None:
        """Stop accepting and close every waiting connection; pulls being served end on their own."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(timeout=5.0)
        self._senders.shutdown(wait=False, cancel_futures=True)
        self._wake_w.close()
        self._wake_r.close()
