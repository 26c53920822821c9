"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a flattened, paged batch.

Parameter names equal transformers' so a checkpoint's state dict loads as it is. The
arithmetic follows transformers' modeling_llama op for op (RMSNorm in float32, rope with
cos/sin cast to the model dtype, SiLU-gated MLP) so that float32 logits agree to ~1e-6.

Unlike transformers, there is no batch dimension: a step is one flat list of tokens from
many sequences, and attention reads each sequence's context from the paged KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tandem.engine.attention import AttentionBackend, AttentionMetadata
from tandem.engine.model_config import ModelConfig
from tandem.engine.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.rotary = rotary

    def forward(
        self,
        positions: torch.Tensor,  # int64 [num_tokens]
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
        kv_scale: tuple[float, float] = (1.0, 1.0),  # FP8 KV cache: this layer's (k_scale, v_scale)
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale, kv_scale)  # [num_tokens, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(config, rotary)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        kv_scale: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        residual = hidden
        hidden = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, meta, backend, kv_scale)
        hidden = residual + hidden
        residual = hidden
        hidden = self.mlp(self.post_attention_layernorm(hidden))
        return residual + hidden


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, rotary) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The full model. `forward` returns final hidden states; `compute_logits` projects rows."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, rotary)  # `rotary` (buffers only) is shared by all layers
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[torch.Tensor],  # one per layer
        meta: AttentionMetadata,
        backend: AttentionBackend,
        kv_scales: Sequence[tuple[float, float]] | None = None,  # per layer, FP8 KV cache only
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        hidden = self.model.embed_tokens(input_ids)
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            hidden = layer(positions, hidden, kv_cache, meta, backend, kv_scales[i] if kv_scales else (1.0, 1.0))
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [rows, vocab] float32
        if self.config.tie_word_embeddings:
            return nn.functional.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()  # a module call: `lm_head` may be a quantized linear
