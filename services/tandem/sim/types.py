"""The values the simulator's parts exchange: a request of a workload or trace, a model's shapes,
a GPU type, the shape of one engine step, and the cost model that turns a step into seconds.

The event loop (`sim/cluster.py`) only ever asks a `CostModel` how long a step or a KV hand-off
takes; the roofline model (`sim/costmodel.py`) and the CPU model calibrated from measured step
times (`sim/calibrate.py`) both implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """What the cost model needs of a decoder-only transformer (grouped-query attention, gated MLP)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2  # weights and KV, bf16/fp16


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
