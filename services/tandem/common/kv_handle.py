"""The KV handle (DESIGN.md section 4): what a prefill worker returns so that a decode worker
can pull the prompt's KV.

Who builds it: the prefill worker, when it grants a lease on a finished prompt's blocks. Who
reads it: the gateway (passes it on unchanged) and the decode worker, which checks it against
its own layout and the request once (`check`) and hands it to its KV transport. The codec
carries it across gRPC (`kv_codec.handle_to_proto` / `kv_codec.handle_from_proto`). This module
imports nothing else from the project but the leaf modules next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.common.block_hash import num_blocks_for
from tandem.common.layout import KVLayout, LayoutMismatchError

MAX_HANDLE_BLOCKS = 1 << 20  # a handle naming more blocks than this is malformed
LEASE_SECRET_BYTES = 32  # random bytes of a lease's secret (`secrets.token_bytes`)


@dataclass(frozen=True)
class KVHandle:
    """Request id, source worker and address, the source block ids in order, the number of
    tokens with valid KV, the source's layout, the block hashes and the lease deadline."""

    request_id: str
    source_worker_id: str
    source_address: str  # host:port of the source's gRPC server
    block_ids: tuple[int, ...]  # source block ids in block-table order
    num_tokens: int  # positions with valid KV (the prompt)
    layout: KVLayout  # the source's
    block_hashes: tuple[int, ...]  # hashes of the full blocks
    lease_deadline_unix_s: float
    # Empty only in handles that never reach a source (tests, benchmarks that build one by
    # hand); the codec refuses a handle from a peer whose secret is not LEASE_SECRET_BYTES long.
    lease_secret: bytes = field(default=b"", repr=False)
    # The source's host id when it serves same-host pulls (`tandem.common.host_id`); "": it does not.
    source_host_id: str = ""

    def check(self, layout: KVLayout, request_id: str, num_prompt_tokens: int) -> None:
        """The receiver's one check of a handle, before it reserves anything: `layout` is the
        receiver's, the other two are the request's. Raises `LayoutMismatchError` naming the
        differing fields, or ValueError if the handle does not describe the request."""
        mismatch = layout.mismatch(self.layout)
        if mismatch is not None:
            raise LayoutMismatchError(mismatch)
        if self.request_id != request_id:
            raise ValueError("handle.request_id differs from request.request_id")
        num_blocks = num_blocks_for(self.num_tokens, layout.block_size)
        if self.num_tokens != num_prompt_tokens or len(self.block_ids) != num_blocks:
            raise ValueError(
                f"handle covers {self.num_tokens} tokens in {len(self.block_ids)} blocks; "
                f"the prompt has {num_prompt_tokens} tokens"
            )
