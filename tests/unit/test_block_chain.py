"""The compiled chain loop (`tandem.common._block_chain`) against the pure-Python path of
`hash_blocks`: built in every environment that runs the tests, the same hashes on random
inputs, the same errors for bad token ids, and the golden vectors on the fallback path too."""

from __future__ import annotations

import array
import enum
import random
import struct
from collections.abc import Sequence

import numpy as np
import pytest

from tandem.common import block_hash
from tandem.common.block_hash import ROOT_PARENT_HASH, _python_hash_blocks, block_extra, hash_blocks
from tests.unit.test_block_hash import GOLDEN

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def test_the_compiled_module_is_built_and_used() -> None:
    # `pip install -e .` (make install, CI) compiles it: a clean clone's `make test` fails here
    # if it did not.
    from tandem.common import _block_chain

    assert block_hash._compiled_chain is _block_chain.hash_chain


def _random_tokens(rng: random.Random, count: int) -> list[int]:
    def one() -> int:
        draw = rng.random()
        if draw < 0.05:
            return rng.choice([INT64_MIN, INT64_MAX, -1, 0])
        if draw < 0.15:
            return rng.randrange(INT64_MIN, INT64_MAX + 1)
        return rng.randrange(200_000)

    return [one() for _ in range(count)]


@pytest.mark.parametrize("seed", range(40))
def test_compiled_and_python_paths_give_the_same_hashes(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 16, 32, 64, 300])  # 300: a record over the C stack buffer
    tokens = _random_tokens(rng, rng.choice([0, 1, block_size - 1, block_size, rng.randrange(0, 5000)]))
    extra = block_extra(f"model-{seed}", rng.choice([None, "", "salt", "s" * 3000]))
    num_full = len(tokens) // block_size
    expected = _python_hash_blocks(tokens, block_size, extra, ROOT_PARENT_HASH, 0) if num_full else []
    assert len(expected) == num_full
    assert hash_blocks(tokens, block_size, extra) == expected
    assert hash_blocks(tuple(tokens), block_size, extra) == expected
    for start in {0, num_full // 2, max(num_full - 1, 0), num_full, num_full + 3}:
        parent = expected[start - 1] if 0 < start <= num_full else rng.randrange(2**64)
        resumed = _python_hash_blocks(tokens, block_size, extra, parent, start) if start < num_full else []
        assert hash_blocks(tokens, block_size, extra, parent, start) == resumed
        if 0 < start <= num_full:
            assert resumed == expected[start:]


class Token(enum.IntEnum):
    BOS = 1
    EOS = 2


class Indexable:
    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


@pytest.mark.parametrize(
    "tokens",
    [
        np.arange(-40, 40, dtype=np.int64),  # numpy ints: struct.pack takes them through __index__
        array.array("q", range(64)),
        range(100, 164),
        [True, False, Token.BOS, Token.EOS, Indexable(INT64_MIN), Indexable(7), 2**62, -5] * 4,
    ],
    ids=["numpy", "array", "range", "int-likes"],
)
def test_other_sequences_and_int_likes_hash_as_their_int_values(tokens: Sequence[int]) -> None:
    as_ints = [int(t) for t in tokens]
    extra = block_extra("m")
    expected = _python_hash_blocks(as_ints, 16, extra, 0x1234, 0)
    assert len(expected) == len(as_ints) // 16
    assert hash_blocks(tokens, 16, extra, 0x1234) == expected
    assert _python_hash_blocks(tokens, 16, extra, 0x1234, 0) == expected


def _struct_message(value: object) -> str:
    with pytest.raises(struct.error) as raised:
        struct.pack("<q", value)
    return str(raised.value)


@pytest.mark.parametrize("bad", [2**63, INT64_MIN - 1, 2**200, 1.5, "7", None, Indexable(2**64)])
@pytest.mark.parametrize("position", [0, 17, 63])
def test_a_bad_token_id_raises_struct_packs_error_on_both_paths(bad: object, position: int) -> None:
    tokens: list[object] = list(range(64))
    tokens[position] = bad
    extra = block_extra("m")
    for path in (hash_blocks, lambda *args: _python_hash_blocks(*args, ROOT_PARENT_HASH, 0)):
        with pytest.raises(struct.error) as raised:
            path(tokens, 16, extra)
        assert str(raised.value) == _struct_message(bad)


def test_tokens_outside_the_hashed_blocks_are_not_read() -> None:
    extra = block_extra("m")
    good = list(range(48))
    # a bad id in the trailing partial block, and one in a block before start_block
    tokens: list[object] = [None, *good[1:], 2**70, "x"]
    expected = _python_hash_blocks(good, 16, extra, 99, 1)
    assert hash_blocks(tokens, 16, extra, 99, 1) == expected  # type: ignore[arg-type]
    assert _python_hash_blocks(tokens, 16, extra, 99, 1) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("parent", "message"), [(2**64, "int too big to convert"), (-1, "can't convert negative")])
def test_an_out_of_range_parent_hash_raises_overflow_error_on_both_paths(parent: int, message: str) -> None:
    extra = block_extra("m")
    with pytest.raises(OverflowError, match=message):
        hash_blocks(list(range(32)), 16, extra, parent, 0)
    with pytest.raises(OverflowError, match=message):
        _python_hash_blocks(list(range(32)), 16, extra, parent, 0)


def test_bad_block_size_and_start_block_are_refused() -> None:
    with pytest.raises(ValueError, match="^start_block must be >= 0, got -1$"):
        hash_blocks(list(range(64)), 16, b"", ROOT_PARENT_HASH, -1)
    from tandem.common._block_chain import hash_chain

    with pytest.raises(ValueError, match=r"^block_size must be in \[1, 2\*\*32\), got 0$"):
        hash_chain([1], 0, b"", 0, 0)
    with pytest.raises(ValueError, match=r"^start_block must be >= 0, got -2$"):
        hash_chain([1], 1, b"", 0, -2)
    with pytest.raises(TypeError, match=r"takes 5 arguments \(4 given\)$"):
        hash_chain([1], 1, b"", 0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="^token_ids must be a sequence of ints$"):
        hash_chain(5, 1, b"", 0, 0)  # type: ignore[arg-type]
    assert hash_chain([1, 2, 3], 2, b"", 0, 1) == []  # start_block at the end: nothing to hash


def test_a_list_that_shrinks_while_it_is_read_is_an_error_not_a_crash() -> None:
    tokens: list[object] = list(range(64))

    class Shrinker:
        def __index__(self) -> int:
            del tokens[20:]
            return 5

    tokens[3] = Shrinker()
    with pytest.raises(RuntimeError, match="^token_ids changed size during hashing$"):
        hash_blocks(tokens, 16, b"")  # type: ignore[arg-type]


@pytest.mark.parametrize(("tokens", "block_size", "extra", "parent", "start", "expected"), GOLDEN)
def test_golden_block_hashes_on_the_python_path(
    tokens: list[int],
    block_size: int,
    extra: bytes,
    parent: int,
    start: int,
    expected: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(block_hash, "_compiled_chain", None)
    assert hash_blocks(tokens, block_size, extra, parent, start) == expected
    assert block_hash.reference_block_hash("tiny", 16) == 0xBE417B77101DF27B
