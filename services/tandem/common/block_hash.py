"""Chained block hashes (DESIGN.md section 4), shared by the gateway, scheduler and workers.

`hash(block) = H(parent_hash, token_ids_of_block, extra)` with H = xxh3-64 over a fixed
little-endian encoding, so the value is stable across processes, hosts and Python versions
(never Python's `hash()`). Only full blocks are hashed. `extra` carries the model id and an
optional per-tenant cache salt, so two models or two tenants never share cache entries.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import numpy as np
import xxhash

_compiled_chain: Callable[[Sequence[int], int, bytes, int, int], list[int]] | None
try:  # the chain loop in C (_block_chain.c), built when the package is installed
    from tandem.common._block_chain import hash_chain as _compiled_chain
except ImportError:  # built without a C compiler: the pure-Python path, same hashes
    _compiled_chain = None

BlockHash = int  # unsigned 64-bit

# Version of the hash function below. Workers publish it when they register, and a gateway
# routes only to workers whose version equals its own: bump it whenever `hash_block` or
# `block_extra` would give another value for the same tokens.
BLOCK_HASH_VERSION = 1

# Parent hash of the first block of every sequence.
ROOT_PARENT_HASH: BlockHash = 0

# The reference token vector of the hash parity check at registration: a worker publishes
# `reference_block_hash` of it under its own model id and block size, and a gateway refuses a
# worker whose value differs from its own (a different hash function, model id or block
# size would make every prefix lookup miss). Fixed forever: changing it is a hash version bump.
REFERENCE_TOKEN_IDS: tuple[int, ...] = tuple((7919 * i + 104729) % 32000 for i in range(64))


_HEADER = struct.Struct("<QI")  # parent hash, tokens in the block

# Below this many blocks, `hash_blocks` builds the records with bytes concatenation (cheaper
# than numpy's fixed cost); above, with one numpy table.
_BULK_MIN_BLOCKS = 4


def block_extra(model_id: str, cache_salt: str | None = None) -> bytes:
    """Encode the `extra` field: model id and optional cache salt, unambiguously separated."""
    salt = cache_salt or ""
    model = model_id.encode()
    return struct.pack("<I", len(model)) + model + salt.encode()


def hash_block(parent_hash: BlockHash, token_ids: Sequence[int], extra: bytes) -> BlockHash:
    """Hash one full block given its parent's hash (ROOT_PARENT_HASH for the first block).

    The definition: xxh3-64 (seed 0) of `<Q parent_hash`, `<I len(token_ids)`, each token as
    `<q`, then `extra`. `hash_blocks` computes the same bytes in bulk."""
    header = _HEADER.pack(parent_hash, len(token_ids))
    return xxhash.xxh3_64_intdigest(header + struct.pack(f"<{len(token_ids)}q", *token_ids) + extra)


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra: bytes,
    parent_hash: BlockHash = ROOT_PARENT_HASH,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` from block index `start_block` on.

    `parent_hash` must be the hash of block `start_block - 1` (or ROOT_PARENT_HASH when
    starting at 0). Trailing tokens that do not fill a block are not hashed.

    Equal to chaining `hash_block`. The compiled module (`_block_chain.c`) does it in one
    call: it packs each block's tokens (`<q`, the same checks and errors as `struct.pack`)
    into one record buffer and chains xxh3-64 over it. Without it, `_python_hash_blocks`.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if start_block < 0:
        raise ValueError(f"start_block must be >= 0, got {start_block}")
    if len(token_ids) // block_size <= start_block:
        return []
    if _compiled_chain is not None:
        return _compiled_chain(token_ids, block_size, extra, parent_hash, start_block)
    return _python_hash_blocks(token_ids, block_size, extra, parent_hash, start_block)


def _python_hash_blocks(
    token_ids: Sequence[int], block_size: int, extra: bytes, parent_hash: BlockHash, start_block: int
) -> list[BlockHash]:
    """`hash_blocks` over bytes, in Python (for at least one block): the tokens are packed once
    (`<q` each), numpy lays out one record per block, `<I block_size | tokens | extra`, and the
    only per-block Python work is prefixing the parent hash and one xxh3 call."""
    num_full = len(token_ids) // block_size
    num_blocks = num_full - start_block
    packed = struct.pack(f"<{num_blocks * block_size}q", *token_ids[start_block * block_size : num_full * block_size])
    lead = struct.pack("<I", block_size)
    token_bytes = 8 * block_size
    if num_blocks < _BULK_MIN_BLOCKS:  # a decode step's one new block: skip numpy's setup
        records = b"".join(lead + packed[off : off + token_bytes] + extra for off in range(0, len(packed), token_bytes))
    else:
        table = np.empty((num_blocks, 4 + token_bytes + len(extra)), dtype=np.uint8)  # [num_blocks, record]
        table[:, :4] = np.frombuffer(lead, dtype=np.uint8)
        table[:, 4 : 4 + token_bytes] = np.frombuffer(packed, dtype=np.uint8).reshape(num_blocks, token_bytes)
        table[:, 4 + token_bytes :] = np.frombuffer(extra, dtype=np.uint8)
        records = table.tobytes()
    return _chain(records, 4 + token_bytes + len(extra), parent_hash)


def _chain(records: bytes, record_bytes: int, parent_hash: BlockHash) -> list[BlockHash]:
    """Hash each `record_bytes` record of `records` prefixed with its parent's hash (`<Q`),
    which is the previous record's hash."""
    hashes: list[BlockHash] = []
    append = hashes.append
    digest = xxhash.xxh3_64_intdigest
    for off in range(0, len(records), record_bytes):
        parent_hash = digest(parent_hash.to_bytes(8, "little") + records[off : off + record_bytes])
        append(parent_hash)
    return hashes


def reference_block_hash(model_id: str, block_size: int) -> BlockHash:
    """The hash of the last full block of `REFERENCE_TOKEN_IDS` (tiled to at least one block
    when `block_size` exceeds its length), chained from the first block, with `model_id` and
    no cache salt. Workers publish it when they register; gateways compare it with their own."""
    copies = -(-block_size // len(REFERENCE_TOKEN_IDS)) if block_size > 0 else 1
    return hash_blocks(REFERENCE_TOKEN_IDS * copies, block_size, block_extra(model_id))[-1]


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens (ceiling division)."""
    return -(-num_tokens // block_size)
