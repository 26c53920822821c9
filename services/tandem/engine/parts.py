"""What an engine is built from: its loaded model, its paged KV cache and its speculator.

Who calls it: `Engine.__init__` (engine/engine.py), once, in this order:
1. `LoadedModel.load(model_dir, config)`: sets torch's thread count (`num_threads`), reads the
   checkpoint's `ModelConfig` (`dtype` overrides its dtype), bounds `max_model_len` by the
   model's, and loads the weights on the resolved device (quantized per `quantization`).
2. `PagedCache.allocate(model, config, kv_shared_dir)`: the block pool and one cache tensor
   per layer (`num_blocks`, else as many blocks as `kv_cache_bytes` holds; a CPU cache lives
   in a shared pool file under `kv_shared_dir`), the attention backend, and the model runner
   over them. An FP8 cache has per-layer scales by the fixed rule of tandem.engine.kv_cache.
3. `build_speculator(config, model, cache)`: the proposer named by `speculative_config`.
The engine owns every part afterwards; nothing here keeps a reference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tandem.engine.attention import AttentionBackend, create_backend
from tandem.engine.block_pool import BlockPool
from tandem.engine.config import EngineConfig
from tandem.engine.kv_cache import KVCacheSpec, KVScales, kv_cache_dtype
from tandem.engine.loader import load_model, resolve_device
from tandem.engine.model_config import ModelConfig
from tandem.engine.model_runner import ModelRunner
from tandem.engine.models import LlamaForCausalLM
from tandem.engine.quant.linear import resident_weight_bytes
from tandem.engine.quant.scheme import QuantPlan
from tandem.engine.spec.proposer import ProposerContext
from tandem.engine.spec.speculator import Speculator


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model, loaded on its device (step 1 above)."""

    model_dir: Path
    model_config: ModelConfig
    max_model_len: int  # the config's bound, never above the model's
    device: torch.device
    model: LlamaForCausalLM
    quant_plan: QuantPlan | None
    weight_bytes: int  # as held: quantized weights at their size

    @classmethod
    def load(cls, model_dir: Path, config: EngineConfig) -> LoadedModel:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        model_config = ModelConfig.from_dir(model_dir)
        if config.dtype is not None:
            model_config = replace(model_config, dtype_name=config.dtype)
        max_model_len = min(config.max_model_len or model_config.max_model_len, model_config.max_model_len)
        device = resolve_device(config.device)
        model, quant_plan = load_model(model_dir, model_config, device, max_model_len, config.quantization)
        return cls(model_dir, model_config, max_model_len, device, model, quant_plan, resident_weight_bytes(model))


@dataclass(frozen=True)
class PagedCache:
    """The paged KV cache and the runner that reads and writes it (step 2 above)."""

    kv_spec: KVCacheSpec
    kv_scales: KVScales | None  # FP8 cache only
    pool: BlockPool
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    backend: AttentionBackend
    runner: ModelRunner

    @classmethod
    def allocate(cls, loaded: LoadedModel, config: EngineConfig, kv_shared_dir: str | None) -> PagedCache:
        model_config = loaded.model_config
        kv_spec = KVCacheSpec(
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            block_size=config.block_size,
            dtype=kv_cache_dtype(config.kv_cache_dtype, model_config.dtype),
        )
        # FP8 cache: per-layer scales by the fixed rule of tandem.engine.kv_cache (never from a batch)
        kv_scales = KVScales.load(loaded.model_dir, model_config.num_layers) if kv_spec.is_fp8 else None
        num_blocks = config.num_blocks or kv_spec.num_blocks_for_bytes(config.kv_cache_bytes)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no {kv_spec.bytes_per_block}-byte block")
        pool = BlockPool(num_blocks, config.enable_prefix_caching)
        kv_caches = kv_spec.allocate(num_blocks, loaded.device, kv_shared_dir)
        backend = create_backend(config.attention_backend, loaded.device)
        runner = ModelRunner(
            loaded.model,
            kv_caches,
            backend,
            config.block_size,
            loaded.device,
            kv_scales=[kv_scales.layer(i) for i in range(model_config.num_layers)] if kv_scales else None,
        )
        return cls(kv_spec, kv_scales, pool, kv_caches, backend, runner)


def build_speculator(config: EngineConfig, loaded: LoadedModel, cache: PagedCache) -> Speculator | None:
    """The proposer named by `speculative_config` (None: no speculation)."""
    if config.speculative_config is None:
        return None
    context = ProposerContext(
        target_config=loaded.model_config,
        device=loaded.device,
        dtype=loaded.model_config.dtype,
        block_size=config.block_size,
        num_blocks=cache.pool.num_blocks,
        backend=cache.backend,
        max_model_len=loaded.max_model_len,
        seed=config.seed,
        target_dir=loaded.model_dir,
    )
    return Speculator.build(config.speculative_config, context, config.max_num_batched_tokens)
