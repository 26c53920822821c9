"""Shared-memory segments of the same-host KV hand-off: naming, create, open, unlink, sweep.

A segment is one file in a tmpfs directory (`KVTransferConfig.shm_dir`, default `/dev/shm`)
that a receiver (decode worker) owns and reuses across pulls: a source (prefill worker) packs
one pull's blocks into it (block_store.py's layout), the receiver verifies and unpacks them.
Why files in /dev/shm rather than a memfd passed over a Unix socket: the control call stays the
authenticated gRPC one (cluster token, lease secret), there is no second socket to secure, and
pods or containers that should share the path mount one volume there.

Why reused: a fresh 64 MiB segment page-faults its tmpfs pages at ~1.3 GB/s on the development
machines (48 ms of a 54 ms pack); a segment whose pages are allocated and mapped once on both
sides costs only the copies and checksums.

Name: `tandem-kv-{pid namespace}-{receiver pid}-{16 hex}`. Ownership and frees:
1. The receiver creates it (O_EXCL, mode 0600, every page allocated and mapped at once) and
   keeps it in its pool (shm_pool.SegmentPool) while it is idle.
2. For one pull it lends it to a source by name (PullKVShm). The source opens it only if it
   is a segment of its pid namespace named for the calling pid, a regular file of its own
   uid, of a size it accepts; it keeps it mapped for the next pull (shm_pool.LentSegments)
   and writes into it only while that PullKVShm call runs.
3. The receiver reads it after the answer and gives it back to its pool. After a failed or
   cancelled pull it unlinks it instead: the source may still be writing.
4. The receiver unlinks its segments on close, when idle too long, or beyond its byte cap.
   A source unmaps a segment once its file is gone.
5. Process death: a dead receiver's segments are unlinked by the janitor of a source that
   maps them, and by `sweep_dead`, which every source and receiver runs when it starts, every
   10 s while it serves or pulls, and when a same-host pull fails. A dead source leaves
   nothing behind but its shared KV pool (`tandem-kv-{ns}-{pid}-pool-{16 hex}`, a CPU prefill
   worker's cache: shm_pool_source.py), which `sweep_dead` unlinks the same way.
Pids are only compared within one pid namespace (other namespaces' segments are never swept).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import stat
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PREFIX = "tandem-kv-"
SWEEP_PERIOD_S = 10.0  # how often either side sweeps the directory for any dead receiver's segments
_NAME_RE = re.compile(r"^tandem-kv-([0-9]+)-([0-9]+)-(pool-)?[0-9a-f]{16}$")


def pid_namespace() -> int:
    """This process's pid namespace (the inode of /proc/self/ns/pid); 0 where there is none."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def pid_alive(pid: int) -> bool:
    """Whether `pid` (of our namespace) runs: not absent, not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class SegmentName:
    namespace: int
    receiver_pid: int  # the owner's pid: a segment's receiver, or a source pool's process
    pool: bool = False  # a prefill worker's KV cache (engine.kv_cache.allocate_shared), not a segment

    @staticmethod
    def parse(name: str) -> SegmentName | None:
        """The name's parts, or None if it is not a segment name (of any namespace)."""
        match = _NAME_RE.match(name)
        if match is None:
            return None
        return SegmentName(int(match[1]), int(match[2]), match[3] is not None)

    @staticmethod
    def new() -> str:
        """A fresh name for a segment of this process (the receiver)."""
        return f"{PREFIX}{pid_namespace()}-{os.getpid()}-{secrets.token_hex(8)}"


def check_name(name: str, receiver_pid: int) -> None:
    """ValueError unless `name` is a segment of our pid namespace named for `receiver_pid`."""
    parts = SegmentName.parse(name)
    if parts is None or parts.pool or parts.namespace != pid_namespace() or parts.receiver_pid != receiver_pid:
        raise ValueError(f"{name[:120]!r} is not a KV segment of receiver pid {receiver_pid} in this namespace")


def unlink_quietly(directory: str, name: str) -> bool:
    """Remove the segment; False if it was already gone."""
    try:
        os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
        return False
    return True


def sweep_dead(directory: str) -> list[str]:
    """Unlink the segments and source pools of our pid namespace whose owner pid is dead;
    return their names. Never raises (a missing directory sweeps nothing)."""
    ours = pid_namespace()
    swept = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        parts = SegmentName.parse(name)
        if parts is None or parts.namespace != ours or pid_alive(parts.receiver_pid):
            continue
        try:
            if unlink_quietly(directory, name):
                swept.append(name)
        except OSError as exc:
            log.warning("cannot sweep KV segment %s: %s", name, exc)
    if swept:
        log.info("swept %d KV segments of dead processes from %s", len(swept), directory)
    return swept


class Segment:
    """One mapped segment: `view` is a uint8 tensor over all of its `size_bytes` (MAP_SHARED).
    `inode` tells a segment from another file later made under the same name."""

    def __init__(self, directory: str, name: str, fd: int, size_bytes: int) -> None:
        self.directory, self.name, self.size_bytes = directory, name, size_bytes
        self.inode = os.fstat(fd).st_ino
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE  # page tables filled now, not per pull
        self._mapped = mmap.mmap(fd, size_bytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = torch.frombuffer(self._mapped, dtype=torch.uint8)  # [size_bytes]

    @staticmethod
    def create(directory: str, size_bytes: int) -> Segment:
        """A new segment of this process (the receiver) with every page allocated. OSError if
        the directory refuses it (full, missing); nothing is left behind then."""
        name = SegmentName.new()
        fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, size_bytes)  # tmpfs pages now, or ENOSPC now rather than SIGBUS later
            return Segment(directory, name, fd, size_bytes)
        except BaseException:
            unlink_quietly(directory, name)
            raise
        finally:
            os.close(fd)

    @staticmethod
    def open(directory: str, name: str, receiver_pid: int, min_bytes: int, max_bytes: int) -> Segment:
        """The source's side: map a receiver's segment. ValueError unless `name` is a segment
        of our pid namespace named for `receiver_pid`, a regular file of our uid with
        `min_bytes..max_bytes` bytes; OSError if it cannot be opened."""
        check_name(name, receiver_pid)
        fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ValueError(f"KV segment {name} is not a regular file of uid {os.geteuid()}")
            if not min_bytes <= info.st_size <= max_bytes:
                raise ValueError(f"KV segment {name} has {info.st_size} bytes, expected {min_bytes}..{max_bytes}")
            return Segment(directory, name, fd, info.st_size)
        finally:
            os.close(fd)

    def still_there(self) -> bool:
        """Whether our file still exists under its name (not unlinked, not replaced)."""
        try:
            return os.stat(os.path.join(self.directory, self.name)).st_ino == self.inode
        except OSError:
            return False

    def unlink(self) -> None:
        if self.still_there():
            unlink_quietly(self.directory, self.name)

    def close(self) -> None:
        """Unmap (the file stays unless unlinked). Only when no thread uses `view` or a slice
        of it any more: torch.frombuffer does not pin the mapping, a use after this faults."""
        del self.view
        try:
            self._mapped.close()
        except BufferError:  # a buffer export of the mmap itself (none of ours): freed with it
            log.warning("KV segment %s is still exported; unmapped when released", self.name)
