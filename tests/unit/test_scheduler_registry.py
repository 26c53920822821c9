"""The registry view refuses workers whose block hashes differ from the gateway's."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from tandem.common.block_hash import BLOCK_HASH_VERSION, REFERENCE_TOKEN_IDS, hash_blocks, reference_block_hash
from tandem.common.workers import WorkerInfo, WorkerRole
from tandem.scheduler.registry import HashScheme, RegistrationCheck

# Golden values: the reference vector and the hash function are fixed forever (a change is a
# BLOCK_HASH_VERSION bump), so every release computes these same numbers.
REF_TINY_16 = 0xBE417B77101DF27B
REF_TINY_32 = 0x304C55B5C8C60D13
REF_BIG_16 = 0xAD189F2FDC6FF53A
REF_TINY_128 = 0x35C775568C20B8BE


def worker(worker_id: str = "d-0", model_id: str = "tiny", block_size: int = 16, **changes: object) -> WorkerInfo:
    """A worker as it registers: its reference hash computed by its code under its own model
    id and block size (unless `changes` names another)."""
    info = WorkerInfo(
        worker_id,
        WorkerRole.DECODE,
        "127.0.0.1:7000",
        "ab12",
        64,
        "t",
        block_size,
        model_id,
        BLOCK_HASH_VERSION,
        reference_block_hash(model_id, block_size),
    )
    return replace(info, **changes)  # type: ignore[arg-type]


WORKER = worker()


def test_reference_block_hash_golden_values() -> None:
    assert len(REFERENCE_TOKEN_IDS) == 64
    assert reference_block_hash("tiny", 16) == REF_TINY_16
    assert reference_block_hash("tiny", 32) == REF_TINY_32
    assert reference_block_hash("big", 16) == REF_BIG_16
    # The last block's hash chains over the whole vector, with no salt.
    assert hash_blocks(REFERENCE_TOKEN_IDS, 16, b"\x04\x00\x00\x00tiny")[-1] == REF_TINY_16
    # A block larger than the vector: the vector is tiled to one full block.
    assert (
        reference_block_hash("tiny", 128)
        == REF_TINY_128
        == hash_blocks(REFERENCE_TOKEN_IDS * 2, 128, b"\x04\x00\x00\x00tiny")[0]
    )


@pytest.mark.parametrize(
    ("registered", "expected"),
    [
        (worker(), None),
        (
            worker(model_id="big"),
            "model_id (ours 'tiny', theirs 'big'), "
            "reference block hash (ours 0xbe417b77101df27b, theirs 0xad189f2fdc6ff53a)",
        ),
        (
            worker(block_size=32),
            "block_size (ours 16, theirs 32), "
            "reference block hash (ours 0xbe417b77101df27b, theirs 0x304c55b5c8c60d13)",
        ),
        # Same declared values, another hash function: only the reference vector tells.
        (
            worker(reference_hash=0x1234),
            "reference block hash (ours 0xbe417b77101df27b, theirs 0x0000000000001234): the hash function differs",
        ),
        (worker(reference_hash=None), "no reference block hash published (a worker older than the hash parity check)"),
        (worker(block_hash_version=9), "block_hash_version (ours 1, theirs 9)"),
        (
            worker(block_size=8, model_id=""),
            "block_size (ours 16, theirs 8), model_id (ours 'tiny', theirs ''), "
            "reference block hash (ours 0xbe417b77101df27b, theirs 0x4e3edafb29c259bd)",
        ),
    ],
)
def test_mismatch_names_every_differing_value(registered: WorkerInfo, expected: str | None) -> None:
    assert HashScheme(16, "tiny").mismatch(registered) == expected


def test_no_model_id_accepts_any_model_but_still_checks_the_rest() -> None:
    """Without a model id there is no reference hash to compare: a scheduler without a gateway."""
    scheme = HashScheme(16, None)
    assert scheme.reference_hash is None
    assert scheme.mismatch(worker(model_id="anything")) is None
    assert scheme.mismatch(worker(reference_hash=None)) is None
    assert scheme.mismatch(worker(block_size=32)) == "block_size (ours 16, theirs 32)"


BIG = "model_id (ours 'tiny', theirs 'big'), reference block hash (ours 0xbe417b77101df27b, theirs 0xad189f2fdc6ff53a)"
OLD = "no reference block hash published (a worker older than the hash parity check)"


def test_accept_filters_and_logs_each_refused_worker_once(caplog: pytest.LogCaptureFixture) -> None:
    check = RegistrationCheck(HashScheme(16, "tiny"))
    other = worker("d-1", model_id="big")
    old = worker("d-2", reference_hash=None)
    with caplog.at_level(logging.WARNING, logger="tandem.scheduler.registry"):
        assert check.accept([WORKER, other, old]) == [WORKER]
        assert check.accept([WORKER, other, old]) == [WORKER]
        assert check.refused == {"d-1": BIG, "d-2": OLD}
        assert check.accept([WORKER]) == [WORKER]  # d-1 and d-2 left the registry
        assert check.refused == {}
        assert check.accept([other]) == []  # back, still refused: logged again
    assert [r.getMessage() for r in caplog.records] == [
        f"not routing to worker d-1: its block hashes differ: {BIG}",
        f"not routing to worker d-2: its block hashes differ: {OLD}",
        f"not routing to worker d-1: its block hashes differ: {BIG}",
    ]


def test_worker_info_validates_its_hash_scheme() -> None:
    with pytest.raises(ValueError, match=r"^block_size must be an int >= 1, got 0$"):
        replace(WORKER, block_size=0)
    with pytest.raises(ValueError, match=r"^block_hash_version must be an int >= 0, got -1$"):
        replace(WORKER, block_hash_version=-1)
    with pytest.raises(ValueError, match="^model_id must be a string of at most 256 characters"):
        replace(WORKER, model_id="m" * 257)
    with pytest.raises(ValueError, match=r"^reference_hash must be None or an unsigned 64-bit int, got -1$"):
        replace(WORKER, reference_hash=-1)
    with pytest.raises(
        ValueError, match=r"^reference_hash must be None or an unsigned 64-bit int, got 18446744073709551616$"
    ):
        replace(WORKER, reference_hash=2**64)
    with pytest.raises(ValueError, match=r"^kv_epoch must be an int >= 0, got -1$"):
        replace(WORKER, kv_epoch=-1)
