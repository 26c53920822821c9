"""The receiver's read-only mappings of same-host sources' KV pools (shm_pool_source.py,
step 3).

Owner: the receiver's `PoolPuller`, on its event loop; reader threads only read the planes
of a mapping they were handed. A source's pool is mapped once per source pid and re-checked on
each pull (`still_valid`): a pool file named for that pid in our pid namespace, a regular file
of our uid, exactly `num_blocks * bytes_per_block` bytes. A mapping is never unmapped
explicitly: its numpy planes keep it alive while a reader thread uses them.
"""

from __future__ import annotations

import mmap
import os
import stat

import numpy as np

from tandem.kvtransfer.block_store import KVBlockStore
from tandem.kvtransfer.shm_segments import SegmentName, pid_alive, pid_namespace


class PoolMapping:
    """A source's pool mapped read-only: per layer `[2, num_blocks, ...]` tensors over it."""

    def __init__(self, directory: str, name: str, source_pid: int, store: KVBlockStore, num_blocks: int) -> None:
        parts = SegmentName.parse(name)
        if parts is None or not parts.pool or parts.namespace != pid_namespace() or parts.receiver_pid != source_pid:
            raise ValueError(f"{name[:120]!r} is not a KV pool of source pid {source_pid} in this namespace")
        self.path, self.source_pid, self.num_blocks = os.path.join(directory, name), source_pid, num_blocks
        self.size_bytes = num_blocks * store.bytes_per_block
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            self.inode = info.st_ino
            self._check(info)
            mapped = mmap.mmap(fd, self.size_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        # read-only: nothing here can write the source's cache; the arrays keep the mapping alive
        flat = np.frombuffer(mapped, dtype=np.uint8)
        self.planes = list(flat.reshape(2 * store.layout.num_layers, num_blocks, -1))

    def _check(self, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise ValueError(f"KV pool {self.path} is not a regular file of uid {os.geteuid()}")
        if info.st_size != self.size_bytes:
            raise ValueError(f"KV pool {self.path} has {info.st_size} bytes, the layout needs {self.size_bytes}")

    def still_valid(self) -> bool:
        """The same file is still there with its size, and its owner runs (checked per pull)."""
        try:
            info = os.stat(self.path, follow_symlinks=False)
            self._check(info)
        except (OSError, ValueError):
            return False
        return info.st_ino == self.inode and pid_alive(self.source_pid)


class PoolMappings:
    """The receiver's mappings, one per source pid. A replaced one is only dropped, never
    unmapped: a reader thread may still use it (the tensors keep the mapping alive)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._by_pid: dict[int, PoolMapping] = {}
        self._by_address: dict[str, PoolMapping] = {}  # the pool a source address last answered with

    def last(self, address: str) -> PoolMapping | None:
        return self._by_address.get(address)

    def remember(self, address: str, mapping: PoolMapping) -> None:
        self._by_address[address] = mapping

    def get(self, name: str, source_pid: int, store: KVBlockStore, num_blocks: int) -> PoolMapping:
        """ValueError if the pool may not be used, OSError if it cannot be opened."""
        known = self._by_pid.get(source_pid)
        path = os.path.join(self.directory, name)
        if known is not None and known.path == path and known.num_blocks == num_blocks and known.still_valid():
            return known
        self._by_pid.pop(source_pid, None)
        mapping = PoolMapping(self.directory, name, source_pid, store, num_blocks)
        self._by_pid[source_pid] = mapping
        return mapping

    def close(self) -> None:
        self._by_pid.clear()
        self._by_address.clear()
