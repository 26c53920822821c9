"""Reuse of same-host KV segments (kvtransfer/shm_pool.py): the receiver's pool (sizes, reuse,
idle and byte limits, discard, close) and the source's mappings of lent segments (checks,
reuse, janitor)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.kvtransfer.shm_pool import LentSegments, SegmentPool
from tandem.kvtransfer.shm_segments import PREFIX, Segment, pid_namespace

MIB = 1 << 20


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_pool_rounds_sizes_up_allocates_every_page_and_reuses_the_smallest_fit(tmp_path: Path) -> None:
    pool = SegmentPool(str(tmp_path))
    small, large = pool.acquire(MIB + 1), pool.acquire(5 * MIB)
    assert (small.size_bytes, large.size_bytes, pool.num_created) == (2 * MIB, 6 * MIB, 2)
    info = os.stat(tmp_path / small.name)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_blocks * 512 == 2 * MIB  # allocated, not sparse
    assert small.name.startswith(f"{PREFIX}{pid_namespace()}-{os.getpid()}-")
    pool.give_back(large)
    pool.give_back(small)
    assert pool.acquire(MIB).name == small.name  # the smallest that fits
    assert pool.acquire(MIB).name == large.name  # the only one left
    assert pool.num_created == 2 and files(tmp_path) == sorted([small.name, large.name])
    pool.close()
    assert files(tmp_path) == []


def test_pool_unlinks_idle_segments_past_their_time_and_beyond_its_bytes(tmp_path: Path) -> None:
    stale = SegmentPool(str(tmp_path), idle_s=0.0)
    first = stale.acquire(MIB)
    stale.give_back(first)
    second = stale.acquire(MIB)  # the first was idle longer than 0 s: unlinked, a new one made
    assert second.name != first.name and files(tmp_path) == [second.name] and stale.num_created == 2
    stale.give_back(second)
    stale.trim()  # what the receiver's timer calls when no pull comes
    assert files(tmp_path) == [] and stale.names == []
    stale.close()
    capped = SegmentPool(str(tmp_path), max_bytes=4 * MIB)
    a, b, c = (capped.acquire(MIB) for _ in range(3))  # 2 MiB each, all busy
    assert len(files(tmp_path)) == 3
    for segment in (a, b, c):
        capped.give_back(segment)
    assert files(tmp_path) == sorted([b.name, c.name]) == capped.names  # the longest idle went first
    capped.close()
    assert files(tmp_path) == []


def test_discard_and_close_unlink_busy_segments(tmp_path: Path) -> None:
    pool = SegmentPool(str(tmp_path))
    failed, busy = pool.acquire(MIB), pool.acquire(MIB)
    pool.discard(failed)
    assert files(tmp_path) == [busy.name] == pool.names
    pool.close()
    assert files(tmp_path) == [] and pool.names == []
    pool.give_back(busy)  # a pull that ended after close: unmapped, not kept
    assert pool.names == [] and files(tmp_path) == []


def test_source_maps_a_lent_segment_once_and_checks_it(tmp_path: Path) -> None:
    pool = SegmentPool(str(tmp_path))
    segment = pool.acquire(MIB)
    lent = LentSegments(str(tmp_path))
    mapped = lent.checkout(segment.name, os.getpid(), MIB, 8 * MIB)
    mapped.view[100] = 42
    assert int(segment.view[100]) == 42  # one memory, two mappings
    lent.checkin(mapped)
    assert lent.checkout(segment.name, os.getpid(), MIB, 8 * MIB) is mapped  # reused, not remapped
    lent.checkin(mapped)
    with pytest.raises(ValueError, match=f"is not a KV segment of receiver pid {os.getpid() + 1} in this namespace"):
        lent.checkout(segment.name, os.getpid() + 1, MIB, 8 * MIB)
    with pytest.raises(ValueError, match=f"has {2 * MIB} bytes, expected {3 * MIB}..{8 * MIB}"):
        LentSegments(str(tmp_path)).checkout(segment.name, os.getpid(), 3 * MIB, 8 * MIB)
    link = f"{PREFIX}{pid_namespace()}-{os.getpid()}-{'e' * 16}"
    os.symlink(tmp_path / segment.name, tmp_path / link)
    with pytest.raises(OSError):  # O_NOFOLLOW
        lent.checkout(link, os.getpid(), MIB, 8 * MIB)
    os.unlink(tmp_path / link)
    with pytest.raises(FileNotFoundError):
        lent.checkout(f"{PREFIX}{pid_namespace()}-{os.getpid()}-{'f' * 16}", os.getpid(), MIB, 8 * MIB)
    assert lent.collect() == [] and lent.names == [segment.name]  # the receiver still has it
    pool.close()  # the receiver unlinks it: the source unmaps it
    assert lent.collect() == [] and lent.names == []


def test_source_never_unmaps_a_segment_a_pull_writes_into(tmp_path: Path) -> None:
    pool = SegmentPool(str(tmp_path))
    segment = pool.acquire(MIB)
    lent = LentSegments(str(tmp_path))
    writing = lent.checkout(segment.name, os.getpid(), MIB, 8 * MIB)
    os.rename(tmp_path / segment.name, tmp_path / "moved")  # a misbehaving receiver: another file, same name
    with open(tmp_path / segment.name, "wb") as file:
        file.truncate(2 * MIB)
    replaced = lent.checkout(segment.name, os.getpid(), MIB, 8 * MIB)
    assert replaced is not writing and lent.names == [segment.name]
    writing.view[7] = 1  # still mapped: the first pull has not checked it in
    lent.close()
    assert hasattr(writing, "view") and hasattr(replaced, "view")  # both in use
    lent.checkin(writing)
    assert not hasattr(writing, "view") and hasattr(replaced, "view")
    lent.checkin(replaced)
    assert not hasattr(replaced, "view") and lent.names == []
    pool.close()


def test_source_janitor_unlinks_a_dead_receivers_segment(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    name = f"{PREFIX}{pid_namespace()}-{dead.pid}-{'a' * 16}"
    with open(tmp_path / name, "wb") as file:
        file.truncate(2 * MIB)
    lent = LentSegments(str(tmp_path))
    in_use = lent.checkout(name, dead.pid, MIB, 8 * MIB)
    assert lent.collect() == [] and files(tmp_path) == [name]  # a pull writes into it now
    lent.checkin(in_use)
    assert lent.collect() == [name] and files(tmp_path) == [] and lent.names == []


def test_segment_create_leaves_nothing_when_the_directory_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Segment.create(str(tmp_path / "missing"), MIB)
    assert files(tmp_path) == []
