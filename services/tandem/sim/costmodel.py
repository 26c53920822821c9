"""The roofline cost model: how long one engine step, or one KV hand-off, takes on a GPU type.

Per step (one worker of `tp` GPUs, tensor parallel):

    seconds = max(flops / (tp x peak_flops x mfu), bytes / (tp x mem_bandwidth x mbu))
              + all_reduce_seconds + step_overhead_s

- flops = 2 x layer_params x tokens                       (linear layers; tokens = prefill
                                                          tokens + decode sequences)
        + 2 x vocab x hidden x decode_seqs                (LM head: logits of the sampled tokens;
                                                          a prefill chunk's one sampled token is
                                                          left out, under 1 / chunk of its cost)
        + 4 x layers x heads x head_dim x context         (attention: QK^T and PV, 2 FLOPs per
                                                          multiply-add; context = prefill
                                                          context tokens + decode context tokens)
- bytes = weight_bytes                                    (all weights, read once per step)
        + kv_bytes_per_token x decode_context_tokens      (decode reads every cached token)
        + kv_bytes_per_token x tokens                     (the new tokens' K and V are written)
        + 2 x layers x hidden x dtype_bytes x tokens      (activations: each layer reads and
                                                          writes the residual stream)
- all_reduce_seconds (tp > 1 only): two all-reduces per layer (after attention, after the MLP)
  of tokens x hidden x dtype_bytes each; a ring all-reduce sends 2 (tp - 1) / tp of that per
  GPU over `tp_link`, and each costs the link's latency.

A prefill attends with flash attention, whose K/V re-reads stay in SRAM/L2 at these sizes: the
prefill context enters the FLOPs, not the bytes. Weights are bf16 (`ModelShape.dtype_bytes`).

`transfer_seconds(nbytes)` = nbytes / kv_link.bandwidth + kv_link.latency_s.

Model presets carry the published shapes: Llama 3 (Meta's `config.json` of Meta-Llama-3-8B and
-70B) and OPT (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models", Table 1;
vocabulary 50272 as in the released `config.json`).
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

from tandem.sim.types import GpuSpec, ModelShape, StepShape


def _llama(name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, kv_heads, hidden // heads, ffn, 128256)


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, heads, hidden // heads, 4 * hidden, 50272, gated_mlp=False)


MODELS: Mapping[str, ModelShape] = types.MappingProxyType(
    {
        shape.name: shape
        for shape in (
            _llama("llama-3-8b", 32, 4096, 32, 8, 14336),
            _llama("llama-3-70b", 80, 8192, 64, 8, 28672),
            _opt("opt-13b", 40, 5120, 40),
            _opt("opt-66b", 64, 9216, 72),
            _opt("opt-175b", 96, 12288, 96),
        )
    }
)


def model_shape(name: str) -> ModelShape:
    """The preset called `name` (case-insensitive, e.g. `OPT-13B`); ValueError lists the known ones."""
    shape = MODELS.get(name.strip().lower())
    if shape is None:
        raise ValueError(f"Unknown model {name!r}; known: {', '.join(sorted(MODELS))}.")
    return shape


def layer_params(shape: ModelShape) -> int:
    """Weights of one decoder layer's linear maps (attention q, k, v, o and the MLP); biases
    and norms are left out (under 0.1 %)."""
    q_o = 2 * shape.hidden_size * shape.num_heads * shape.head_dim
    k_v = 2 * shape.hidden_size * shape.num_kv_heads * shape.head_dim
    mlp = (3 if shape.gated_mlp else 2) * shape.hidden_size * shape.intermediate_size
    return q_o + k_v + mlp


def weight_params(shape: ModelShape) -> int:
    """Weights a step reads: every layer plus the LM head (vocab x hidden; the embedding lookup
    reads only the step's rows)."""
    return shape.num_layers * layer_params(shape) + shape.vocab_size * shape.hidden_size


def kv_bytes_per_token(shape: ModelShape) -> int:
    """K and V of one token over all layers."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * shape.dtype_bytes


def step_flops(shape: ModelShape, step: StepShape) -> float:
    """FLOPs of one step (module docstring), over all GPUs of the worker."""
    tokens = step.prefill_tokens + step.decode_seqs
    linear = 2.0 * shape.num_layers * layer_params(shape) * tokens
    lm_head = 2.0 * shape.vocab_size * shape.hidden_size * step.decode_seqs
    context = step.prefill_context_tokens + step.decode_context_tokens
    attention = 4.0 * shape.num_layers * shape.num_heads * shape.head_dim * context
    return linear + lm_head + attention


def step_bytes(shape: ModelShape, step: StepShape) -> float:
    """HBM bytes one step moves (module docstring), over all GPUs of the worker."""
    tokens = step.prefill_tokens + step.decode_seqs
    kv = kv_bytes_per_token(shape) * (step.decode_context_tokens + tokens)
    activations = 2 * shape.num_layers * shape.hidden_size * shape.dtype_bytes * tokens
    return float(weight_params(shape) * shape.dtype_bytes + kv + activations)


@dataclass(frozen=True)
class Link:
    """A link: `bandwidth` in bytes/s (one direction) and a fixed `latency_s` per message."""

    bandwidth: float
    latency_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"link bandwidth must be a positive number of bytes/s, got {self.bandwidth!r}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"link latency_s must be a number >= 0, got {self.latency_s!r}")

    def seconds(self, nbytes: float) -> float:
        return nbytes / self.bandwidth + self.latency_s


# KV hand-off between hosts: one 400 Gb/s RDMA NIC (InfiniBand NDR / ConnectX-7) per GPU.
DEFAULT_KV_LINK = Link(bandwidth=50e9, latency_s=20e-6)
# Tensor parallel inside a host: NVLink 4 (H100 SXM: 900 GB/s both directions, 450 each way);
# the latency is an all-reduce kernel's launch and synchronisation.
DEFAULT_TP_LINK = Link(bandwidth=450e9, latency_s=8e-6)


@dataclass(frozen=True)
class Efficiency:
    """What fraction of the peaks a step reaches, and its fixed cost (kernel launches, the
    batcher, sampling). The defaults are typical of vLLM-class engines on Hopper: about half
    the tensor-core peak in large GEMMs, about 80 % of HBM bandwidth in decode."""

    mfu: float = 0.5
    mbu: float = 0.8
    step_overhead_s: float = 2e-3

    def __post_init__(self) -> None:
        for name in ("mfu", "mbu"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 1):
                raise ValueError(f"{name} is a fraction in (0, 1], got {value!r}")
        if not (math.isfinite(self.step_overhead_s) and self.step_overhead_s >= 0):
            raise ValueError(f"step_overhead_s must be a number >= 0, got {self.step_overhead_s!r}")


@dataclass(frozen=True)
class RooflineCostModel:
    """The `CostModel` of one worker: `model` on `tp` GPUs of type `gpu` (module docstring)."""

    model: ModelShape
    gpu: GpuSpec
    tp: int = 1
    efficiency: Efficiency = field(default_factory=Efficiency)
    kv_link: Link = DEFAULT_KV_LINK
    tp_link: Link = DEFAULT_TP_LINK

    def __post_init__(self) -> None:
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp must be an int >= 1, got {self.tp!r}")

    def compute_seconds(self, step: StepShape) -> float:
        return step_flops(self.model, step) / (self.tp * self.gpu.peak_flops * self.efficiency.mfu)

    def memory_seconds(self, step: StepShape) -> float:
        return step_bytes(self.model, step) / (self.tp * self.gpu.mem_bandwidth * self.efficiency.mbu)

    def all_reduce_seconds(self, step: StepShape) -> float:
        if self.tp == 1:
            return 0.0
        tokens = step.prefill_tokens + step.decode_seqs
        per_gpu = 2 * (self.tp - 1) / self.tp * tokens * self.model.hidden_size * self.model.dtype_bytes
        return 2 * self.model.num_layers * self.tp_link.seconds(per_gpu)

    def step_seconds(self, step: StepShape) -> float:
        """Wall time of one step; 0 for a step with no tokens (the worker is idle)."""
        if step.prefill_tokens + step.decode_seqs == 0:
            return 0.0
        roofline = max(self.compute_seconds(step), self.memory_seconds(step))
        return roofline + self.all_reduce_seconds(step) + self.efficiency.step_overhead_s

    def transfer_seconds(self, nbytes: int) -> float:
        return self.kv_link.seconds(nbytes)

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model)

    def kv_capacity_tokens(self, memory_fraction: float = 0.9) -> int:
        """Tokens of KV the worker holds: `memory_fraction` of its GPUs' memory, less the
        weights (vLLM's `gpu_memory_utilization`); 0 when the weights do not fit."""
        free = self.tp * self.gpu.memory_bytes * memory_fraction - weight_params(self.model) * self.model.dtype_bytes
        return max(0, int(free // self.kv_bytes_per_token()))
