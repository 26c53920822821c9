"""The paged KV cache tensors of one worker (DESIGN.md section 4 layout), and their FP8 scales.

Element type: the model's dtype (`--kv-cache-dtype auto`), or FP8 (`fp8`/`fp8_e4m3`:
float8_e4m3fn, `fp8_e5m2`: float8_e5m2). An FP8 cache stores `cast(clamp(x / scale))` and
attention reads `fp8 * scale` (tandem.kernels.cache_write), with one K and one V scale per layer.

Scale rule (`KVScales.load`), fixed at startup and the same on every worker of a checkpoint, so
prefill and decode workers hold bit-identical FP8 bytes for the same tokens:
1. The checkpoint's `quantization_config.kv_cache_scheme` in config.json (compressed-tensors,
   as llm-compressor writes it): the scalar tensors `model.layers.{i}.self_attn.k_scale` and
   `v_scale` (or the older `self_attn.k_proj.output_scale` / `v_proj.output_scale`) of the
   safetensors files, as vLLM reads them. A missing or non-positive one is an error.
2. Otherwise every scale is 1.0: vLLM's default when a checkpoint has no scales (vLLM can
   also compute them from the first batch, `calculate_kv_scales`; Tandem never does, because
   the first batch differs between workers and outputs would not be reproducible).
Scales never change after startup. The layout fingerprint carries their digest.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import mmap
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open

from tandem.engine.config import KV_CACHE_DTYPES

log = logging.getLogger(__name__)

# Tensor names of layer i's scales, in the order they are looked for.
_SCALE_NAMES: dict[str, tuple[str, ...]] = {
    "k": ("model.layers.{i}.self_attn.k_scale", "model.layers.{i}.self_attn.k_proj.output_scale"),
    "v": ("model.layers.{i}.self_attn.v_scale", "model.layers.{i}.self_attn.v_proj.output_scale"),
}
FP8_KV_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of `--kv-cache-dtype name` (config.KV_CACHE_DTYPES) for a model."""
    stored = KV_CACHE_DTYPES[name]
    return model_dtype if stored is None else getattr(torch, stored)


@dataclass(frozen=True)
class KVScales:
    """Per-layer FP8 dequantization scales of K and V, and where they came from."""

    k: tuple[float, ...]
    v: tuple[float, ...]
    source: str  # "checkpoint" or "default" (1.0)

    @staticmethod
    def default(num_layers: int) -> KVScales:
        return KVScales((1.0,) * num_layers, (1.0,) * num_layers, "default")

    @staticmethod
    def load(model_dir: Path, num_layers: int) -> KVScales:
        """The scale rule of the module doc for the checkpoint in `model_dir`."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        scheme = (config.get("quantization_config") or {}).get("kv_cache_scheme")
        if not scheme:
            return KVScales.default(num_layers)
        found: dict[str, float] = {}
        for file in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    if name.endswith(("_scale",)) and ".self_attn." in name:
                        found[name] = float(f.get_tensor(name).float().reshape(-1)[0])
        scales: dict[str, list[float]] = {"k": [], "v": []}
        for kind, patterns in _SCALE_NAMES.items():
            for i in range(num_layers):
                names = [p.format(i=i) for p in patterns]
                value = next((found[n] for n in names if n in found), None)
                if value is None:
                    raise ValueError(f"config.json has a kv_cache_scheme but the weights have no {names[0]}")
                if not (value > 0.0 and math.isfinite(value)):
                    raise ValueError(f"KV cache scale {names[0]} is {value}; it must be positive and finite")
                scales[kind].append(value)
        return KVScales(tuple(scales["k"]), tuple(scales["v"]), "checkpoint")

    def layer(self, i: int) -> tuple[float, float]:
        return self.k[i], self.v[i]

    @property
    def digest(self) -> str:
        """xxh64 of the float32 scales (K then V): what the layout fingerprint carries."""
        packed = struct.pack(f"<{2 * len(self.k)}f", *self.k, *self.v)
        return xxhash.xxh64_hexdigest(packed)


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the cache: one `[2, num_blocks, block_size, num_kv_heads, head_dim]` tensor
    per layer (K at index 0, V at index 1), in `dtype`: the model's, or an FP8 format."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_KV_DTYPES

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies across all layers, K and V."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element_size

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def num_blocks_for_bytes(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_block

    def allocate(self, num_blocks: int, device: torch.device, shared_dir: str | None = None) -> list[torch.Tensor]:
        """Zeroed cache tensors. With `shared_dir` and a CPU device, all layers live in one
        shared pool file there (`allocate_shared`), so same-host receivers read blocks in place."""
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        if shared_dir is not None and torch.device(device).type == "cpu":
            try:
                return allocate_shared(shared_dir, shape, self.dtype, self.num_layers)
            except OSError as exc:  # e.g. a small /dev/shm in a container: same-host pulls use segments
                log.warning("KV cache not in shared memory (%s): private memory instead", exc)
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]


# ---- a CPU cache in shared memory (same-host KV, kvtransfer/shm_pool_source.py reads it) -------
# File `{dir}/tandem-kv-{pid namespace}-{pid}-pool-{16 hex}`, mode 0600, the layers one after
# the other: `num_layers * 2 * num_blocks * block bytes` bytes. Named for the owning pid, so
# kvtransfer.shm_segments.sweep_dead unlinks it once that process is dead; mapped for the
# process's lifetime (the tensors keep the mapping alive).
_SHARED_POOLS: dict[int, str] = {}  # first layer's data_ptr -> the pool file's path


def allocate_shared(directory: str, shape: tuple[int, ...], dtype: torch.dtype, num_layers: int) -> list[torch.Tensor]:
    """`num_layers` zeroed tensors of `shape` over one new shared pool file (see above)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    path = os.path.join(directory, f"tandem-kv-{namespace}-{os.getpid()}-pool-{secrets.token_hex(8)}")
    layer_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        os.posix_fallocate(fd, 0, num_layers * layer_bytes)  # tmpfs pages (zeroes) now, not SIGBUS later
        mapped = mmap.mmap(fd, num_layers * layer_bytes, flags=mmap.MAP_SHARED)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    flat = torch.frombuffer(mapped, dtype=torch.uint8)  # holds `mapped` for the tensors' lifetime
    layers = [flat[i * layer_bytes : (i + 1) * layer_bytes].view(dtype).view(shape) for i in range(num_layers)]
    _SHARED_POOLS[layers[0].data_ptr()] = path
    atexit.register(_unlink_own, path, os.getpid())  # a killed process's: swept (see above)
    return layers


def _unlink_own(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never from a forked child
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def shared_pool_path(kv_caches: list[torch.Tensor]) -> str | None:
    """The pool file that `kv_caches` (as `allocate_shared` made them) live in, else None."""
    if not kv_caches or kv_caches[0].device.type != "cpu":
        return None
    path = _SHARED_POOLS.get(kv_caches[0].data_ptr())
    if path is None:
        return None
    layer_bytes = kv_caches[0].numel() * kv_caches[0].element_size()
    base = kv_caches[0].data_ptr()
    contiguous = all(c.data_ptr() == base + i * layer_bytes and c.is_contiguous() for i, c in enumerate(kv_caches))
    return path if contiguous and os.path.exists(path) else None
