"""Freezing the startup heap: what is alive at the call leaves the collector's generations (a
full collection no longer walks it), what is allocated afterwards is collected as usual."""

from __future__ import annotations

import gc

from tandem.common.gc_heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_the_heap_alive_at_the_call_is_frozen_and_later_objects_are_collected() -> None:
    before = _Node()
    try:
        frozen = freeze_startup_heap("test")
        # frozen objects freed since (by reference counting) leave the count: never more than frozen
        assert 0 < gc.get_freeze_count() <= frozen
        assert not any(o is before for o in gc.get_objects())  # the permanent generation is not walked
        after = _Node()
        assert any(o is after for o in gc.get_objects())
        del after
        assert gc.collect() >= 1  # the later cycle is still garbage-collected
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
