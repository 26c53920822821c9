"""The values the simulator's parts exchange: a request of a workload or trace, a model's shapes,
a GPU type, the shape of one engine step, and the cost model that turns a step into seconds.

The event loop (`sim/cluster.py`) only ever asks a `CostModel` how long a step or a KV hand-off
takes; the roofline model (`sim/costmodel.py`) and the CPU model calibrated from measured step
times (`sim/calibrate.py`) both implement it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload: when it arrives and how long it is.

    `prefix_group` names the shared prefix the prompt starts with (None: no shared prefix) and
    `prefix_tokens` its length; requests of one group share exactly those leading tokens."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_group: int | None = None
    prefix_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the cost model needs of a decoder-only transformer (grouped-query attention, gated MLP).

    `gated_mlp` False is a plain two-matrix MLP (OPT: fc1, activation, fc2) instead of the
    gated three-matrix one (Llama: gate, up, down); multi-head attention is num_kv_heads ==
    num_heads."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2  # weights and KV, bf16/fp16
    gated_mlp: bool = True

    @classmethod
    def from_hf_config(cls, path: Path | str) -> ModelShape:
        """The shape in a Hugging Face `config.json` (a file, or the model directory holding it).

        Reads Llama-family keys (`intermediate_size`, `num_key_value_heads`, optional `head_dim`)
        and OPT's (`model_type: opt`, `ffn_dim`, no KV-head key: multi-head attention, plain
        MLP). `torch_dtype` float32 gives 4 bytes, anything else 2. ValueError names a missing
        or bad key."""
        file = Path(path)
        if file.is_dir():
            file = file / "config.json"
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"Cannot read the model config {file}: {err}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file}: a model config is a JSON object")
        opt = config.get("model_type") == "opt"

        def need(key: str) -> int:
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{file}: {key} must be a positive int, got {value!r}")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        return cls(
            name=str(config.get("_name_or_path") or file.parent.name),
            num_layers=need("num_hidden_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads if opt or "num_key_value_heads" not in config else need("num_key_value_heads"),
            head_dim=need("head_dim") if config.get("head_dim") is not None else hidden // heads,
            intermediate_size=need("ffn_dim" if opt else "intermediate_size"),
            vocab_size=need("vocab_size"),
            dtype_bytes=4 if config.get("torch_dtype", config.get("dtype")) == "float32" else 2,
            gated_mlp=not opt,
        )


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU type: dense 16-bit tensor throughput, memory bandwidth and size, an hourly price,
    and where the figures come from."""

    name: str
    peak_flops: float  # dense bf16/fp16 FLOP/s, no sparsity
    mem_bandwidth: float  # bytes/s
    memory_bytes: int
    cost_per_hour_usd: float
    source: str


@dataclass(frozen=True, slots=True)
class StepShape:
    """One engine step of one worker.

    `prefill_tokens` are the prompt tokens computed this step (chunks included) and
    `prefill_context_tokens` the sum, over those tokens, of the context each attends to (for the
    quadratic attention term); `decode_seqs` sequences each decode one token over a total of
    `decode_context_tokens` cached tokens."""

    prefill_tokens: int = 0
    prefill_context_tokens: int = 0
    decode_seqs: int = 0
    decode_context_tokens: int = 0


class CostModel(Protocol):
    """How long work takes on one worker (one GPU, or one CPU process when calibrated)."""

    def step_seconds(self, step: StepShape) -> float:
        """Wall time of one engine step of this shape."""
        ...

    def transfer_seconds(self, nbytes: int) -> float:
        """Wall time of a KV hand-off of `nbytes` between a prefill and a decode worker."""
        ...

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies (all layers, K and V)."""
        ...
