"""routing._view builds a WorkerView without the frozen dataclass's __init__ (a hot path):
it must stay equal to the constructor, which must stay a plain field assignment."""

from __future__ import annotations

import dataclasses

import pytest

from tandem.common.workers import WorkerInfo, WorkerLoad, WorkerRole
from tandem.scheduler.routing import _view
from tandem.scheduler.types import WorkerView

INFO = WorkerInfo("d-0", WorkerRole.DECODE, "10.0.0.1:7000", "ff", 64, "m")


@pytest.mark.parametrize("load", [None, WorkerLoad(1, 2, 300, 5, 64, 9.5)])
def test_view_equals_the_constructor(load: WorkerLoad | None) -> None:
    built = _view(INFO, load, 7)
    assert type(built) is WorkerView
    assert built == WorkerView(INFO, load, 7)
    assert (built.info, built.load, built.num_cached_blocks) == (INFO, load, 7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.num_cached_blocks = 8  # type: ignore[misc]


def test_worker_view_init_only_assigns_its_fields() -> None:
    # `_view` skips __init__: valid only while WorkerView has exactly these fields and no
    # __post_init__ (a check there would be skipped)
    assert [f.name for f in dataclasses.fields(WorkerView)] == ["info", "load", "num_cached_blocks"]
    assert WorkerView.__slots__ == ("info", "load", "num_cached_blocks")
    assert not hasattr(WorkerView, "__post_init__")
