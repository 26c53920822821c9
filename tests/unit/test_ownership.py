"""The owner secret in gRPC metadata (`tandem.common.ownership`) and the worker's record of who
submitted each live request (`tandem.worker.owners`): the first claim wins, the record goes when
the submitting call ends, and a missing, wrong or malformed secret never owns anything."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from tandem.common.ownership import (
    OWNER_METADATA_KEY,
    new_owner_secret,
    owner_from_metadata,
    owner_metadata,
    same_owner,
)
from tandem.worker.owners import RequestOwners


class _Aborted(Exception):
    pass


class FakeContext:
    """The part of grpc.aio.ServicerContext that RequestOwners uses."""

    def __init__(self, owner: str | None = None, extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = ((owner_metadata(owner),) if owner is not None else ()) + extra
        self.done: list[Callable[[Any], None]] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "test"), *self.metadata)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.done.append(callback)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted

    def end(self) -> None:
        for callback in self.done:
            callback(self)


def test_new_secrets_are_fresh_and_accepted() -> None:
    a, b = new_owner_secret(), new_owner_secret()
    assert a != b and len(a) == 43
    assert owner_from_metadata([owner_metadata(a)]) == a
    assert owner_metadata(a) == ("x-tandem-owner", a)


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ((), None),
        (None, None),
        ((("x-tandem-token", "t" * 40),), None),
        ((("x-tandem-owner", "a" * 31),), "x-tandem-owner must be 32 to 128 URL-safe base64 characters"),
        ((("x-tandem-owner", "a" * 129),), "x-tandem-owner must be 32 to 128 URL-safe base64 characters"),
        ((("x-tandem-owner", "a" * 31 + "!"),), "x-tandem-owner must be 32 to 128 URL-safe base64 characters"),
        ((("x-tandem-owner", b"a" * 40),), "x-tandem-owner must be 32 to 128 URL-safe base64 characters"),
        ((("x-tandem-owner", "a" * 40), ("x-tandem-owner", "b" * 40)), "x-tandem-owner appears 2 times"),
    ],
)
def test_owner_from_metadata(metadata: Any, expected: str | None) -> None:
    if expected is None:
        assert owner_from_metadata(metadata) is None
        return
    with pytest.raises(ValueError) as err:
        owner_from_metadata(metadata)
    assert str(err.value) == expected
    assert "a" * 31 not in str(err.value)  # the value itself is never repeated


def test_same_owner() -> None:
    a = new_owner_secret()
    assert same_owner(a, a) is True
    assert same_owner(a, new_owner_secret()) is False
    assert same_owner(a, None) is False and same_owner(None, a) is False and same_owner(None, None) is False


def test_the_submitter_owns_its_request_until_its_call_ends() -> None:
    owners, owner = RequestOwners(), new_owner_secret()
    submit = FakeContext(owner)
    asyncio.run(owners.claim("r1", submit))
    assert owners.owns("r1", FakeContext(owner)) is True
    for stranger in (FakeContext(), FakeContext(new_owner_secret()), FakeContext(extra=((OWNER_METADATA_KEY, "x"),))):
        assert owners.owns("r1", stranger) is False
    assert owners.owns("r2", FakeContext(owner)) is False  # another id: not its own
    submit.end()
    assert owners.owns("r1", FakeContext(owner)) is False and len(owners) == 0


def test_the_first_claim_wins_and_a_later_one_cannot_displace_it() -> None:
    owners, owner, intruder = RequestOwners(), new_owner_secret(), new_owner_secret()
    first, second = FakeContext(owner), FakeContext(intruder)
    asyncio.run(owners.claim("r1", first))
    asyncio.run(owners.claim("r1", second))  # the engine refuses the duplicate; nothing recorded
    assert owners.owns("r1", FakeContext(intruder)) is False
    second.end()  # the intruder's call ends: the owner's record stays
    assert owners.owns("r1", FakeContext(owner)) is True
    first.end()
    assert len(owners) == 0


def test_a_request_submitted_without_a_secret_is_owned_by_nobody() -> None:
    owners = RequestOwners()
    submit = FakeContext()
    asyncio.run(owners.claim("r1", submit))
    assert owners.owns("r1", FakeContext()) is False
    assert owners.owns("r1", FakeContext(new_owner_secret())) is False
    submit.end()
    assert len(owners) == 0


def test_a_malformed_secret_refuses_the_submitting_call() -> None:
    owners = RequestOwners()
    context = FakeContext(extra=((OWNER_METADATA_KEY, "short"),))
    with pytest.raises(_Aborted):
        asyncio.run(owners.claim("r1", context))
    assert context.aborted == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "x-tandem-owner must be 32 to 128 URL-safe base64 characters",
    )
    assert len(owners) == 0 and context.done == []
