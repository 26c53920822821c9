"""The registry view refuses workers whose block hashes differ from the gateway's."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from tandem.common.block_hash import BLOCK_HASH_VERSION
from tandem.common.workers import WorkerInfo, WorkerRole
from tandem.scheduler.registry import HashScheme, RegistrationCheck

WORKER = WorkerInfo("d-0", WorkerRole.DECODE, "127.0.0.1:7000", "ab12", 64, "t", 16, "tiny", BLOCK_HASH_VERSION)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"block_size": 32}, "block_size (ours 16, theirs 32)"),
        ({"model_id": "big"}, "model_id (ours 'tiny', theirs 'big')"),
        ({"block_hash_version": 9}, "block_hash_version (ours 1, theirs 9)"),
        (
            {"block_size": 8, "model_id": ""},
            "block_size (ours 16, theirs 8), model_id (ours 'tiny', theirs '')",
        ),
    ],
)
def test_mismatch_names_every_differing_value(changes: dict[str, object], expected: str | None) -> None:
    assert HashScheme(16, "tiny").mismatch(replace(WORKER, **changes)) == expected  # type: ignore[arg-type]


def test_no_model_id_accepts_any_model_but_still_checks_the_rest() -> None:
    scheme = HashScheme(16, None)
    assert scheme.mismatch(replace(WORKER, model_id="anything")) is None
    assert scheme.mismatch(replace(WORKER, block_size=32)) == "block_size (ours 16, theirs 32)"


def test_accept_filters_and_logs_each_refused_worker_once(caplog: pytest.LogCaptureFixture) -> None:
    check = RegistrationCheck(HashScheme(16, "tiny"))
    other = replace(WORKER, worker_id="d-1", model_id="big")
    with caplog.at_level(logging.WARNING, logger="tandem.scheduler.registry"):
        assert check.accept([WORKER, other]) == [WORKER]
        assert check.accept([WORKER, other]) == [WORKER]
        assert check.refused == {"d-1": "model_id (ours 'tiny', theirs 'big')"}
        assert check.accept([WORKER]) == [WORKER]  # d-1 left the registry
        assert check.refused == {}
        assert check.accept([other]) == []  # back, still refused: logged again
    assert [r.getMessage() for r in caplog.records] == [
        "not routing to worker d-1: its block hashes differ: model_id (ours 'tiny', theirs 'big')"
    ] * 2


def test_worker_info_validates_its_hash_scheme() -> None:
    with pytest.raises(ValueError, match=r"^block_size must be an int >= 1, got 0$"):
        replace(WORKER, block_size=0)
    with pytest.raises(ValueError, match=r"^block_hash_version must be an int >= 0, got -1$"):
        replace(WORKER, block_hash_version=-1)
    with pytest.raises(ValueError, match="^model_id must be a string of at most 256 characters"):
        replace(WORKER, model_id="m" * 257)
