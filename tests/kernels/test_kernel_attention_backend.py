"""TritonAttentionBackend: store then attend, on the engine's [2, NB, BS, KVH, D] cache layout."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.attention import AttentionMetadata, create_backend
from tandem.engine.attention_triton import TritonAttentionBackend
from tandem.kernels.reference import ref_paged_prefill_attention, ref_store_kv

BS, KVH, H, D = 16, 2, 8, 64


def _metadata(seq_lens: list[int], query_lens: list[int], device: torch.device) -> AttentionMetadata:
    """Sequence i owns blocks [4i, 4i + 4) reversed (a non-trivial table); new tokens last."""
    tables = torch.tensor([[4 * i + 3 - j for j in range(4)] for i in range(len(seq_lens))], dtype=torch.int32)
    slots = []
    for i, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        for pos in range(seq_len - query_len, seq_len):
            slots.append(int(tables[i, pos // BS]) * BS + pos % BS)
    loc = [0]
    for n in query_lens:
        loc.append(loc[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        query_lens=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
        block_size=BS,
    )


@pytest.mark.parametrize(
    ("seq_lens", "query_lens"),
    [([9, 40, 64], [1, 1, 1]), ([9, 40, 64], [9, 6, 1])],
    ids=["decode-step", "mixed-step"],
)
def test_backend_forward_matches_reference(
    seq_lens: list[int], query_lens: list[int], rand, check_close, device
) -> None:
    num_seqs = len(seq_lens)
    kv_cache = rand((2, 4 * num_seqs, BS, KVH, D), torch.float16, seed=3)
    qkv = rand((sum(query_lens), H + 2 * KVH, D), torch.float16, seed=4)  # fused projection
    query, key, value = qkv[:, :H], qkv[:, H : H + KVH], qkv[:, H + KVH :]
    meta = _metadata(seq_lens, query_lens, device)
    expected_cache = kv_cache.clone()

    out = TritonAttentionBackend().forward(query, key, value, kv_cache, meta, D**-0.5)

    ref_store_kv(key, value, expected_cache[0], expected_cache[1], meta.slot_mapping)
    assert torch.equal(kv_cache, expected_cache)
    expected = ref_paged_prefill_attention(
        query, expected_cache[0], expected_cache[1], meta.block_tables, meta.query_start_loc, meta.seq_lens, D**-0.5
    )
    check_close(out, expected)


def test_backend_is_registered_as_triton(device) -> None:
    backend = create_backend("triton", device)
    assert isinstance(backend, TritonAttentionBackend) and backend.name == "triton"
