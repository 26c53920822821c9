"""The tcp receiver's kept data connections: one that carried a pull serves the next pull from
the same source, so it starts with the windows and buffers the kernel already grew for it
(tcp_listener.py keeps the source's end). Each pull still presents its own one-time token.
"""

from __future__ import annotations

import socket
import threading
import time

MAX_KEPT_PER_SOURCE = 4  # idle data connections kept per source (concurrent pulls from it)
KEPT_IDLE_S = 60.0  # a kept connection idle this long is closed (the source's limit: 120 s)


class KeptConnections:
    """Data connections that carried a pull, by source listener address, kept for the next
    pull (tcp_listener.py says why). Thread-safe. At most MAX_KEPT_PER_SOURCE per source, each
    idle for less than KEPT_IDLE_S (shorter than the source's own idle timeout); one the source
    closed anyway is found out by the next pull, which then opens a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, list[tuple[socket.socket, float]]] = {}  # address -> (socket, idle since)

    def take(self, address: str) -> socket.socket | None:
        with self._lock:
            self._drop_stale(time.monotonic())
            entries = self._idle.get(address)
            return entries.pop()[0] if entries else None

    def give(self, address: str, sock: socket.socket) -> None:
        with self._lock:
            entries = self._idle.setdefault(address, [])
            if len(entries) < MAX_KEPT_PER_SOURCE:
                entries.append((sock, time.monotonic()))
                return
        sock.close()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._idle.values())

    def __contains__(self, address: object) -> bool:
        with self._lock:
            return bool(self._idle.get(address))  # type: ignore[call-overload]

    def _drop_stale(self, now_s: float) -> None:
        for address, entries in list(self._idle.items()):
            for sock, since in [e for e in entries if now_s - e[1] >= KEPT_IDLE_S]:
                sock.close()
                entries.remove((sock, since))
            if not entries:
                del self._idle[address]

    def close(self) -> None:
        with self._lock:
            for entries in self._idle.values():
                for sock, _ in entries:
                    sock.close()
            self._idle.clear()
