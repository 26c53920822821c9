"""Block hashes for simulated prompts: stable ints that stand for `common.block_hash` chains.

The scheduler's prefix index only compares hashes, so the simulator needs hashes that are
equal exactly where real prompts would share blocks: the leading `prefix_tokens // block_size`
blocks of requests of one prefix group, and nothing else. A group block is
`(group + 1) << 32 | i`; a block of request `rid`'s own tokens is `1 << 62 | rid << 24 | i`.
Both stay below 2**63 for groups and requests below 2**30 and prompts below 2**24 blocks.
"""

from __future__ import annotations

from tandem.sim.types import TraceRequest

_OWN = 1 << 62


def group_block_hashes(group: int, start: int, end: int) -> tuple[int, ...]:
    """Hashes of blocks `start..end-1` of prefix group `group`."""
    base = (group + 1) << 32
    return tuple(base | i for i in range(start, end))


def prompt_block_hashes(rid: int, request: TraceRequest, block_size: int) -> tuple[int, ...]:
    """Hashes of every full block of request `rid`'s prompt, its group prefix first."""
    num_blocks = request.prompt_tokens // block_size
    shared = 0
    if request.prefix_group is not None:
        shared = min(num_blocks, request.prefix_tokens // block_size)
    own = _OWN | rid << 24
    head = group_block_hashes(request.prefix_group, 0, shared) if shared and request.prefix_group is not None else ()
    return head + tuple(own | i for i in range(shared, num_blocks))
