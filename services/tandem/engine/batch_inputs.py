"""The flat batch of one forward pass: input ids, positions and attention metadata.

A pass runs query chunks of many sequences as one flat list of tokens. Chunk `i` holds the
tokens at positions `start .. start + len(token_ids) - 1` of its sequence; their K/V go to the
slots its block table gives, and they attend over the sequence's first `start + len` positions.
Callers: the model runner (one chunk per planned sequence) and the draft-model proposer (its
own chunks over the same block tables). Pure: builds tensors, mutates nothing.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tandem.engine.attention import AttentionMetadata


@dataclass(frozen=True)
class QueryChunk:
    token_ids: Seq[int]  # the chunk's input tokens
    start: int  # position of token_ids[0] in its sequence
    block_table: Seq[int]  # the sequence's block ids, covering every position < start + len


@dataclass(frozen=True)
class BatchInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    query_starts: tuple[int, ...]  # host copy of meta.query_start_loc, [num_chunks + 1]

    @property
    def last_rows(self) -> list[int]:
        """Row of each chunk's last token in the flat batch."""
        return [end - 1 for end in self.query_starts[1:]]


def build_batch_inputs(chunks: Seq[QueryChunk], block_size: int, device: torch.device) -> BatchInputs:
    input_ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    max_blocks = max(len(c.block_table) for c in chunks)
    block_tables = torch.zeros((len(chunks), max_blocks), dtype=torch.int32)
    for i, chunk in enumerate(chunks):
        end = chunk.start + len(chunk.token_ids)
        input_ids.extend(chunk.token_ids)
        pos = torch.arange(chunk.start, end, dtype=torch.int64)
        table = torch.tensor(chunk.block_table, dtype=torch.int64)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        block_tables[i, : len(chunk.block_table)] = table.to(torch.int32)
        query_lens.append(len(chunk.token_ids))
        seq_lens.append(end)
    query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        query_lens=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
        block_size=block_size,
    )
    return BatchInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64, device=device),
        positions=torch.cat(positions).to(device),
        meta=meta,
        query_starts=tuple(query_start_loc.tolist()),
    )
