from collections.abc import Sequence

def hash_chain(
    token_ids: Sequence[int], block_size: int, extra: bytes, parent_hash: int, start_block: int, /
) -> list[int]: ...
