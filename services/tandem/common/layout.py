"""The KV layout and its fingerprint (DESIGN.md section 4).

Two workers may exchange KV only if everything that shapes the bytes matches: architecture,
layer count, KV heads, head dim, model dtype, KV cache dtype (`kv_dtype`: the model's, or an
FP8 format), the FP8 scales (`kv_scales`: a digest of the per-layer k/v scales, "none" for an
unquantized cache), block size, tensor-parallel size and layout version.

The hand-off moves FP8 bytes only: the scales do not travel with the blocks. Equal
fingerprints prove equal scales (the digest is part of them, and a receiver refuses a handle
whose layout differs), so the receiver dequantizes the pulled bytes with its own scales.
`describe()` is a canonical `key=value;...` string that travels in KV handles and pull
requests, so a receiver can say exactly which field differs; `fingerprint` is its stable hash,
published in Redis and compared by the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import xxhash

LAYOUT_VERSION = 2  # 2: kv_dtype and kv_scales (FP8 KV cache)


class LayoutMismatchError(ValueError):
    """Two workers' KV layouts differ; the message names every differing field."""


@dataclass(frozen=True)
class KVLayout:
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    block_size: int
    tensor_parallel_size: int = 1
    layout_version: int = LAYOUT_VERSION
    kv_dtype: str = ""  # torch dtype name of the cache's elements; "" means `dtype`
    kv_scales: str = "none"  # KVScales.digest of an FP8 cache

    def __post_init__(self) -> None:
        if not self.kv_dtype:  # the unquantized default: the cache holds the model's dtype
            object.__setattr__(self, "kv_dtype", self.dtype)

    def describe(self) -> str:
        return ";".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    @property
    def fingerprint(self) -> str:
        return xxhash.xxh64_hexdigest(self.describe().encode())

    @staticmethod
    def parse(text: str) -> KVLayout:
        """Parse `describe()` output from a peer; raises ValueError naming the problem."""
        if len(text) > 1024:
            raise ValueError("KV layout description is too long")
        values: dict[str, str] = {}
        for part in text.split(";"):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"malformed KV layout field {part!r}")
            values[key] = value
        names = [f.name for f in fields(KVLayout)]
        if sorted(values) != sorted(names):
            raise ValueError(f"KV layout fields {sorted(values)} differ from {sorted(names)}")
        try:
            return KVLayout(
                architecture=values["architecture"],
                num_layers=int(values["num_layers"]),
                num_kv_heads=int(values["num_kv_heads"]),
                head_dim=int(values["head_dim"]),
                dtype=values["dtype"],
                block_size=int(values["block_size"]),
                tensor_parallel_size=int(values["tensor_parallel_size"]),
                layout_version=int(values["layout_version"]),
                kv_dtype=values["kv_dtype"],
                kv_scales=values["kv_scales"],
            )
        except ValueError as exc:
            raise ValueError(f"malformed KV layout {text!r}: {exc}") from exc

    def mismatch(self, other: KVLayout) -> str | None:
        """None if exchangeable, else a message naming every differing field."""
        diffs = [
            f"{f.name} (ours {getattr(self, f.name)}, theirs {getattr(other, f.name)})"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        return f"KV layout mismatch: {', '.join(diffs)}" if diffs else None
