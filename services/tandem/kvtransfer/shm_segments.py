"""Shared-memory segments of the same-host KV hand-off: naming, create, map, unlink, sweep.

A segment is one file in a tmpfs directory (`KVTransferConfig.shm_dir`, default `/dev/shm`)
holding one pull's packed buffer (block_store.py's layout). Why files in /dev/shm rather than a
memfd passed over a Unix socket: the control call stays the authenticated gRPC one (cluster
token, lease secret), there is no second socket to secure, and pods or containers that should
share the path mount one volume there. What a memfd gets for free, being freed with its last
holder, we get from the rules below.

Name: `tandem-kv-{pid namespace}-{source pid}-{receiver pid}-{16 hex}`. Ownership and frees:
1. The source creates it (O_EXCL, mode 0600), packs into it, and answers its name (PullKVShm).
   If the call fails or is cancelled before that answer, the source unlinks it.
2. The receiver opens it, unlinks it at once (its mapping keeps the memory alive until it is
   unmapped, also when the receiver dies), verifies, copies, unmaps.
3. The source unlinks every segment it still tracks when its lease ends (release, expiry),
   when the receiver pid is dead, and on close (shm_transport.ShmKVServicer's janitor).
4. Process death: whoever starts (either side) or sees a same-host pull fail sweeps the
   segments of its pid namespace whose source or receiver pid is dead (`sweep_dead`).
Pids are only compared within one pid namespace (other namespaces' segments are never swept).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PREFIX = "tandem-kv-"
_NAME_RE = re.compile(r"^tandem-kv-([0-9]+)-([0-9]+)-([0-9]+)-[0-9a-f]{16}$")


def pid_namespace() -> int:
    """This process's pid namespace (the inode of /proc/self/ns/pid); 0 where there is none."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def pid_alive(pid: int) -> bool:
    """Whether `pid` (of our namespace) runs: not absent, not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class SegmentName:
    namespace: int
    source_pid: int
    receiver_pid: int

    @staticmethod
    def parse(name: str) -> SegmentName | None:
        """The name's parts, or None if it is not a segment name (of any namespace)."""
        match = _NAME_RE.match(name)
        if match is None:
            return None
        return SegmentName(int(match[1]), int(match[2]), int(match[3]))

    @staticmethod
    def new(receiver_pid: int) -> str:
        return f"{PREFIX}{pid_namespace()}-{os.getpid()}-{receiver_pid}-{secrets.token_hex(8)}"


def unlink_quietly(directory: str, name: str) -> bool:
    """Remove the segment; False if it was already gone."""
    try:
        os.unlink(os.path.join(directory, name))
    except FileNotFoundError:
        return False
    return True


def sweep_dead(directory: str) -> list[str]:
    """Unlink the segments of our pid namespace whose source or receiver pid is dead; return
    their names. Never raises (a missing directory sweeps nothing)."""
    ours = pid_namespace()
    swept = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        parts = SegmentName.parse(name)
        if parts is None or parts.namespace != ours:
            continue
        if not (pid_alive(parts.source_pid) and pid_alive(parts.receiver_pid)):
            try:
                if unlink_quietly(directory, name):
                    swept.append(name)
            except OSError as exc:
                log.warning("cannot sweep KV segment %s: %s", name, exc)
    if swept:
        log.info("swept %d KV segments of dead processes from %s", len(swept), directory)
    return swept


def write_segment(directory: str, name: str, size_bytes: int, fill: Callable[[torch.Tensor], int]) -> int:
    """Create the segment `name` (`SegmentName.new`) of `size_bytes`, call `fill(uint8 tensor
    over it)` and return what it returns (the checksum). Unlinked again if `fill` raises."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
        with mmap.mmap(fd, size_bytes) as mapped:
            view = torch.frombuffer(mapped, dtype=torch.uint8)
            try:
                checksum = fill(view)
            finally:
                del view  # the mapping cannot close while a tensor exports it
    except BaseException:
        os.close(fd)
        unlink_quietly(directory, name)
        raise
    os.close(fd)
    return checksum


@contextlib.contextmanager
def map_segment(directory: str, name: str, size_bytes: int) -> Iterator[torch.Tensor]:
    """Open a segment, unlink it (its memory lives while mapped), and yield a uint8 tensor over
    a private mapping of its `size_bytes`. ValueError for a name that is not a segment of this
    namespace or a file of another size; OSError if it cannot be opened."""
    parts = SegmentName.parse(name)
    if parts is None or parts.namespace != pid_namespace() or parts.receiver_pid != os.getpid():
        raise ValueError(f"{name[:120]!r} is not a KV segment made for this process")
    fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        unlink_quietly(directory, name)
        have = os.fstat(fd).st_size
        if have != size_bytes or size_bytes == 0:
            raise ValueError(f"KV segment {name} has {have} bytes, expected {size_bytes}")
        mapped = mmap.mmap(fd, size_bytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        view = torch.frombuffer(mapped, dtype=torch.uint8)
        try:
            yield view
        finally:
            del view
    finally:
        try:
            mapped.close()
        except BufferError:  # a caller kept a view: the mapping goes with its last reference
            log.warning("KV segment %s is still referenced; unmapped when released", name)
