"""Plain torch attention over the paged KV cache: the CPU default and the kernels' oracle.

Decode-only steps are vectorised: each sequence's blocks are gathered into a padded
`[num_seqs, max_context, num_kv_heads, head_dim]` tensor and one masked
`scaled_dot_product_attention` covers the batch. Sequences are first grouped by similar length
(`AttentionMetadata.length_buckets`), one padded call per group, so that one long prompt
joining a batch of short ones does not make every sequence gather its length.

Other steps (prefill chunks, speculative verify chunks) split their chunks by query length.
Short chunks (at most `SHORT_QUERY_TOKENS` tokens: decode rows, verify chunks of 1 + k
tokens, a draft model's catch-up chunks) go through the same padded call per length bucket,
their queries padded to the bucket's longest chunk and a causal mask inside each chunk (query
row r of a chunk of q tokens in a context of s sees positions < s - q + r + 1). Longer chunks
attend one sequence at a time with a causal mask offset by the cached context. The padded
layout of a step (`ShortQueryPlan`) is built once per step, by the first layer, and reused by
the others: the backend keeps the plan of the last metadata it saw (an identity cache, which
changes no result).

FP8 cache: the store quantizes with the layer's scales (`quantize_kv`, the kernels' rule) and
every read dequantizes the gathered blocks to the query's dtype (`dequantize_kv`) before the
attention arithmetic, as the Triton kernels do in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.engine.attention import AttentionMetadata, length_buckets
from tandem.kernels.reference import FP8_DTYPES, dequantize_kv, gather_context, quantize_kv

SHORT_QUERY_TOKENS = 8  # a chunk of at most this many tokens joins the padded call


@dataclass(frozen=True)
class PaddedBucket:
    """One padded attention call over `n` short chunks, each padded to `q_max` query rows."""

    query_index: torch.Tensor  # int64 [n, q_max]: flat query row of each padded row (pads repeat a real row)
    block_tables: torch.Tensor  # int64 [n, max_blocks]
    mask: torch.Tensor  # bool [n, 1, q_max, max_blocks * block_size]
    src: torch.Tensor  # int64 [rows]: real rows of the flattened [n * q_max] result
    dest: torch.Tensor  # int64 [rows]: their flat query rows


@dataclass(frozen=True)
class ShortQueryPlan:
    buckets: tuple[PaddedBucket, ...]
    long_chunks: tuple[tuple[int, int], ...]  # (sequence index, first flat row) of each chunk attended alone


def short_query_plan(meta: AttentionMetadata) -> ShortQueryPlan:
    """The padded layout of `meta`'s chunks of at most `SHORT_QUERY_TOKENS` tokens, grouped by
    context length (`length_buckets`), and the indices of the longer chunks."""
    short = [i for i, q in enumerate(meta.query_lens) if q <= SHORT_QUERY_TOKENS]
    starts = [0]
    for q in meta.query_lens:
        starts.append(starts[-1] + q)
    long_chunks = tuple((i, starts[i]) for i, q in enumerate(meta.query_lens) if q > SHORT_QUERY_TOKENS)
    device = meta.seq_lens.device
    buckets = []
    for group in length_buckets(tuple(meta.seq_lens_host[i] for i in short)):
        seqs = [short[g] for g in group]
        q_max = max(meta.query_lens[i] for i in seqs)
        max_len = max(meta.seq_lens_host[i] for i in seqs)
        max_blocks = -(-max_len // meta.block_size)
        rows = torch.arange(q_max)
        q_lens = torch.tensor([meta.query_lens[i] for i in seqs])
        seq_lens = torch.tensor([meta.seq_lens_host[i] for i in seqs])
        first = torch.tensor([starts[i] for i in seqs])
        real = rows[None, :] < q_lens[:, None]  # [n, q_max]
        query_index = first[:, None] + torch.where(real, rows[None, :], 0)
        # row r of a chunk of q tokens sees positions < s - q + r + 1; a pad row sees the context
        bound = torch.minimum(seq_lens[:, None] - q_lens[:, None] + rows[None, :] + 1, seq_lens[:, None])
        mask = torch.arange(max_blocks * meta.block_size)[None, None, :] < bound[:, :, None]
        src = real.flatten().nonzero().squeeze(1)
        index = torch.tensor(seqs, dtype=torch.long, device=device)
        buckets.append(
            PaddedBucket(
                query_index.to(device),
                meta.block_tables[index, :max_blocks].long(),
                mask[:, None].to(device),
                src.to(device),
                query_index.flatten()[src].to(device),
            )
        )
    return ShortQueryPlan(tuple(buckets), long_chunks)


class TorchAttentionBackend:
    name = "torch"

    def __init__(self) -> None:
        self._plan_meta: AttentionMetadata | None = None  # the metadata `_plan` was built for
        self._plan: ShortQueryPlan | None = None

    def short_plan(self, meta: AttentionMetadata) -> ShortQueryPlan:
        """`short_query_plan(meta)`, built once per step (every layer passes the same `meta`)."""
        if self._plan_meta is not meta or self._plan is None:
            self._plan, self._plan_meta = short_query_plan(meta), meta
        return self._plan

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        kv_scale: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
        stored_k = quantize_kv(key, kv_scale[0], kv_cache.dtype)
        stored_v = quantize_kv(value, kv_scale[1], kv_cache.dtype)
        if kv_cache.dtype in FP8_DTYPES:  # index_copy_ has no CPU fp8 kernel: copy the bytes
            flat, stored_k, stored_v = flat.view(torch.uint8), stored_k.view(torch.uint8), stored_v.view(torch.uint8)
        flat[0].index_copy_(0, meta.slot_mapping, stored_k)
        flat[1].index_copy_(0, meta.slot_mapping, stored_v)
        if meta.is_decode_only:
            return self._decode(query, kv_cache, meta, scale, kv_scale)
        return self._varlen(query, kv_cache, meta, self.short_plan(meta), scale, kv_scale)

    @staticmethod
    def _decode(
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: tuple[float, float],
    ) -> torch.Tensor:
        buckets = meta.length_buckets
        if len(buckets) == 1:
            return _decode_padded(
                query, kv_cache, meta.block_tables, meta.seq_lens, max(meta.seq_lens_host), scale, kv_scale
            )
        out = torch.empty_like(query)
        for index, block_tables, seq_lens, max_len in meta.bucket_tensors:
            out[index] = _decode_padded(query[index], kv_cache, block_tables, seq_lens, max_len, scale, kv_scale)
        return out

    @staticmethod
    def _varlen(
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        plan: ShortQueryPlan,
        scale: float,
        kv_scale: tuple[float, float],
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        for bucket in plan.buckets:
            out[bucket.dest] = _short_padded(query, kv_cache, bucket, scale, kv_scale)
        rep = query.shape[1] // kv_cache.shape[3]  # query heads per KV head
        for i, start in plan.long_chunks:
            q_len, seq_len = meta.query_lens[i], meta.seq_lens_host[i]
            k = gather_context(kv_cache[0], meta.block_tables[i], seq_len)  # [seq_len, kv_heads, head_dim]
            v = gather_context(kv_cache[1], meta.block_tables[i], seq_len)
            k = dequantize_kv(k, kv_scale[0], query.dtype)
            v = dequantize_kv(v, kv_scale[1], query.dtype)
            k = k.transpose(0, 1).repeat_interleave(rep, dim=0)  # [num_heads, seq_len, head_dim]
            v = v.transpose(0, 1).repeat_interleave(rep, dim=0)
            q = query[start : start + q_len].transpose(0, 1)  # [num_heads, q_len, head_dim]
            # query row r sits at position seq_len - q_len + r and sees positions <= it
            rows = torch.arange(q_len, device=query.device)[:, None] + (seq_len - q_len)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= rows
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[start : start + q_len] = o.transpose(0, 1)
        return out


def _short_padded(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    bucket: PaddedBucket,
    scale: float,
    kv_scale: tuple[float, float],
) -> torch.Tensor:
    """Attention of one bucket's short chunks, one masked call: the rows `bucket.dest`."""
    num_seqs, q_max = bucket.query_index.shape
    _, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    max_blocks = bucket.block_tables.shape[1]
    k = kv_cache[0][bucket.block_tables].view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    v = kv_cache[1][bucket.block_tables].view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    k = dequantize_kv(k, kv_scale[0], query.dtype).transpose(1, 2)  # [n, num_kv_heads, ctx, head_dim]
    v = dequantize_kv(v, kv_scale[1], query.dtype).transpose(1, 2)
    q = query[bucket.query_index].transpose(1, 2)  # [n, num_heads, q_max, head_dim]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bucket.mask, scale=scale, enable_gqa=num_heads != num_kv_heads
    )
    return out.transpose(1, 2).reshape(num_seqs * q_max, num_heads, head_dim)[bucket.src]


def _decode_padded(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_len: int,
    scale: float,
    kv_scale: tuple[float, float],
) -> torch.Tensor:
    """One masked attention call for decode queries `[n, num_heads, head_dim]` whose contexts
    (`seq_lens`, longest `max_len`) are gathered from the paged cache, padded to `max_len`."""
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    max_blocks = -(-max_len // block_size)
    tables = block_tables[:, :max_blocks].long()  # [n, max_blocks]
    k = kv_cache[0][tables].view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    v = kv_cache[1][tables].view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    k = dequantize_kv(k, kv_scale[0], query.dtype)
    v = dequantize_kv(v, kv_scale[1], query.dtype)
    k = k.transpose(1, 2)  # [n, num_kv_heads, ctx, head_dim]
    v = v.transpose(1, 2)
    ctx = torch.arange(max_blocks * block_size, device=query.device)
    mask = ctx[None, :] < seq_lens[:, None]  # [n, ctx]
    q = query.unsqueeze(2)  # [n, num_heads, 1, head_dim]
    # enable_gqa: query head h reads KV head h // (num_heads // num_kv_heads), as
    # repeat_interleave would lay it out, without materialising the repeated K and V.
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=num_heads != num_kv_heads
    )
    return out.squeeze(2)
