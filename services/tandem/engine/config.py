"""Engine configuration: one frozen dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.engine.model_config import DTYPE_NAMES
from tandem.engine.quant.scheme import QUANTIZATION_NAMES
from tandem.engine.spec.config import SpeculativeConfig

MiB = 1024 * 1024

# The attention backend registry: name -> "module:class", imported on first use by
# `attention.create_backend`. It lives here, with no imports, so that the config can check a
# name (and the CLI list the choices) without loading torch.
ATTENTION_BACKENDS: dict[str, str] = {
    "torch": "tandem.engine.attention_torch:TorchAttentionBackend",
    "triton": "tandem.engine.attention_triton:TritonAttentionBackend",
}
BACKEND_NAMES: tuple[str, ...] = ("auto", *ATTENTION_BACKENDS)

# KV cache dtypes, vLLM's names: `auto` stores KV in the model's dtype; `fp8` is `fp8_e4m3`.
# Values: the torch dtype name of the stored elements (None: the model's). Kept free of torch
# imports, like the backend registry, so that the CLI lists the choices without loading torch.
KV_CACHE_DTYPES: dict[str, str | None] = {
    "auto": None,
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


@dataclass(frozen=True)
class EngineConfig:
    """Options of `Engine.from_pretrained(path, **options)`.

    KV memory is `num_blocks` blocks of `block_size` tokens; when `num_blocks` is None it is
    derived from `kv_cache_bytes`. `max_num_batched_tokens` is the per-step token budget,
    `max_prefill_chunk_tokens` caps how many prompt tokens one sequence adds to a step
    (chunked prefill), `max_model_len` caps prompt + output (default: the model's limit).
    """

    block_size: int = field(default=16, metadata={"help": "tokens per KV block (a power of two)"})
    num_blocks: int | None = field(default=None, metadata={"help": "KV blocks (default: from --kv-cache-mib)"})
    kv_cache_bytes: int = field(
        default=256 * MiB, metadata={"flag": "kv-cache-mib", "scale": MiB, "help": "KV cache size in MiB"}
    )
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one step"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences in one step"})
    max_prefill_chunk_tokens: int | None = field(
        default=None, metadata={"help": "prompt tokens one sequence adds to a step (chunked prefill)"}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "cap on prompt + output tokens (default: the model's limit)"}
    )
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse cached blocks of equal prefixes"})
    attention_backend: str = field(default="auto", metadata={"choices": BACKEND_NAMES})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    dtype: str | None = field(default=None, metadata={"choices": DTYPE_NAMES, "help": "default: the model's"})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)"})
    seed: int = field(default=0, metadata={"flag": "engine-seed", "help": "seed of the sampler's generator"})
    model_id: str | None = field(
        default=None, metadata={"help": "model id in block hashes (default: the model directory's name)"}
    )
    speculative_config: str | None = field(
        default=None,
        metadata={
            "help": "speculative decoding, vLLM's JSON: "
            '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}\' '
            'or \'{"method": "draft_model", "model": DIR, "num_speculative_tokens": 4}\'',
        },
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "choices": QUANTIZATION_NAMES,
            "help": "fp8: quantize an unquantized checkpoint's linear weights to FP8 while loading "
            "(compressed-tensors checkpoints are detected from config.json)",
        },
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={
            "choices": tuple(KV_CACHE_DTYPES),
            "help": "KV cache element type: auto (the model's dtype) or FP8 with per-layer scales (fp8 = fp8_e4m3)",
        },
    )

    def __post_init__(self) -> None:
        positive = {
            "block_size": self.block_size,
            "kv_cache_bytes": self.kv_cache_bytes,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
        }
        optional_positive = {
            "num_blocks": self.num_blocks,
            "max_prefill_chunk_tokens": self.max_prefill_chunk_tokens,
            "max_model_len": self.max_model_len,
            "num_threads": self.num_threads,
        }
        for name, value in {**positive, **optional_positive}.items():
            if value is None and name in optional_positive:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.attention_backend not in BACKEND_NAMES:
            raise ValueError(f"attention_backend must be one of {BACKEND_NAMES}, got {self.attention_backend!r}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {DTYPE_NAMES} or None, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_NAMES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_NAMES} or None, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.speculative_config is not None:
            SpeculativeConfig.parse(self.speculative_config)  # raises, naming the field
