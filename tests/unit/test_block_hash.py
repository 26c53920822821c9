"""Block hashes are a contract (DESIGN.md section 4): golden values computed with the original
per-block implementation (struct-packed parent, length and tokens, xxh3-64), and the bulk path
checked against the one-block definition on random inputs."""

from __future__ import annotations

import random
import struct

import pytest
import xxhash

from tandem.common.block_hash import (
    ROOT_PARENT_HASH,
    block_extra,
    hash_block,
    hash_blocks,
    reference_block_hash,
)

# A 70-token prompt (4 full blocks of 16, 2 of 32, 70 of 1; 6 trailing tokens at 16).
TOKENS = [(7 * i * i + 3 * i + 11) % 32000 for i in range(70)]
EXTRA = block_extra("tiny-llama")
SALTED = block_extra("tiny-llama", "tenant-a")

GOLDEN = [
    (
        TOKENS,
        16,
        EXTRA,
        ROOT_PARENT_HASH,
        0,
        [0x582DF4DCA7561701, 0xA7BF309D71DB3AF5, 0xFAF7D14EAF28BCC1, 0x737C1A7E666ABAE1],
    ),
    (
        TOKENS,
        16,
        SALTED,
        ROOT_PARENT_HASH,
        0,
        [0x60B6FA89986F3405, 0x5D18BB727457C150, 0x23410BBC566C1156, 0xED8908B8C46C426F],
    ),
    (TOKENS, 32, EXTRA, ROOT_PARENT_HASH, 0, [0xD5F44434352D04C9, 0x2C9DC2F2BDC9667F]),
    (TOKENS, 16, EXTRA, 0x1234, 2, [0x6CE62A03755CF0FD, 0x244C710D63232C7F]),
    (
        [0, -1, 2**63 - 1, -(2**63), 5],
        1,
        b"",
        ROOT_PARENT_HASH,
        0,
        [0x816E64897F74DFE3, 0x29D36E0F6BAF319E, 0x268854EE48D4DE75, 0xF7013BF3550E9CDE, 0x8F834807339F93E8],
    ),
    (TOKENS[:15], 16, EXTRA, ROOT_PARENT_HASH, 0, []),
]


@pytest.mark.parametrize(("tokens", "block_size", "extra", "parent", "start", "expected"), GOLDEN)
def test_golden_block_hashes(
    tokens: list[int], block_size: int, extra: bytes, parent: int, start: int, expected: list[int]
) -> None:
    assert hash_blocks(tokens, block_size, extra, parent, start) == expected
    assert hash_blocks(tuple(tokens), block_size, extra, parent, start) == expected


def test_golden_per_token_block_size_and_reference_hashes() -> None:
    per_token = hash_blocks(TOKENS, 1, EXTRA)
    assert len(per_token) == 70
    assert per_token[:3] == [0x4F517CFF50BFFD26, 0x55D20AE8D3382346, 0xC74A0B38F28B2155]
    assert reference_block_hash("tiny", 16) == 0xBE417B77101DF27B
    assert reference_block_hash("tiny-llama", 16) == 0x874EA9BEAD81C218
    assert reference_block_hash("m", 128) == 0xD99A3F68AB2CE22A


def _original_hash_block(parent: int, tokens: list[int], extra: bytes) -> int:
    """The definition as first written: xxh3-64 of <QI parent, len, then <q per token, extra."""
    h = xxhash.xxh3_64()
    h.update(struct.pack("<QI", parent, len(tokens)))
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    h.update(extra)
    return h.intdigest()


@pytest.mark.parametrize("seed", range(20))
def test_bulk_hashing_equals_the_chained_definition(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 16, 32, 128])
    tokens = [
        rng.randrange(-(2**63), 2**63) if rng.random() < 0.05 else rng.randrange(200_000)
        for _ in range(rng.randrange(0, 700))
    ]
    extra = block_extra(f"model-{seed}", rng.choice([None, "", "salt"]))
    num_full = len(tokens) // block_size
    expected, parent = [], ROOT_PARENT_HASH
    for i in range(num_full):
        parent = _original_hash_block(parent, tokens[i * block_size : (i + 1) * block_size], extra)
        assert (
            hash_block(
                expected[-1] if expected else ROOT_PARENT_HASH, tokens[i * block_size : (i + 1) * block_size], extra
            )
            == parent
        )
        expected.append(parent)
    assert hash_blocks(tokens, block_size, extra) == expected
    start = rng.randrange(0, num_full + 1)
    resume = expected[start - 1] if start else ROOT_PARENT_HASH
    assert hash_blocks(tokens, block_size, extra, resume, start) == expected[start:]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        hash_blocks(TOKENS, 0, EXTRA)
    with pytest.raises(struct.error):
        hash_blocks([2**63], 1, EXTRA)
