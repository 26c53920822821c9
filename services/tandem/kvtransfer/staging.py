"""Reusable host buffers for packed KV, so that a transfer does not page-fault fresh memory.

A new 64 MiB buffer costs about as much to fault in as sending it over loopback TCP, so each
transport (receiver side) and servicer (source side) keeps a few buffers and hands them out
per transfer. Ownership: `acquire` lends a buffer to one transfer; the transfer gives it back
with `give_back` once nothing (thread, gloo op, gRPC message) reads or writes it any more. A
transfer that cannot be sure of that (it was cancelled while a thread still copies) simply
does not give it back, and the garbage collector frees it later.
"""

from __future__ import annotations

import threading

import torch

ROUND_BYTES = 1 << 20  # sizes round up to whole MiB, so that similar prompts share buffers


class StagingPool:
    def __init__(self, max_cached_bytes: int, pin_memory: bool = False) -> None:
        """Keep at most `max_cached_bytes` of idle buffers; `pin_memory` for CUDA hosts."""
        self._max_cached_bytes = max_cached_bytes
        self._pin_memory = pin_memory
        self._lock = threading.Lock()
        self._idle: list[torch.Tensor] = []  # uint8, 1-D
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a lent view -> its buffer
        self.num_allocations = 0

    def acquire(self, size_bytes: int) -> torch.Tensor:
        """A 1-D uint8 CPU tensor of exactly `size_bytes` bytes (contents undefined)."""
        with self._lock:
            fits = [b for b in self._idle if b.numel() >= size_bytes]
            if fits:
                base = min(fits, key=torch.Tensor.numel)
                self._idle = [b for b in self._idle if b is not base]
            else:
                base = None
        if base is None:
            rounded = max(ROUND_BYTES, -(-size_bytes // ROUND_BYTES) * ROUND_BYTES)
            base = torch.empty(rounded, dtype=torch.uint8, pin_memory=self._pin_memory)
            self.num_allocations += 1
        view = base[:size_bytes]
        with self._lock:
            self._lent[view.data_ptr()] = base
        return view

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return a buffer from `acquire`; it may be lent again at once."""
        with self._lock:
            base = self._lent.pop(buffer.data_ptr(), None)
            if base is None:
                return
            self._idle.append(base)
            self._idle.sort(key=torch.Tensor.numel, reverse=True)
            while sum(b.numel() for b in self._idle) > self._max_cached_bytes:
                self._idle.pop()  # drop the smallest first: the big ones are the costly ones

    def forget(self, buffer: torch.Tensor) -> None:
        """The transfer will not give `buffer` back (see module docstring)."""
        with self._lock:
            self._lent.pop(buffer.data_ptr(), None)

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)
