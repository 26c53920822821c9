"""The configuration of `tandem simulate` and `tandem plan`, frozen and validated once; their
flags are generated from these fields (`tandem.common.options`).

`SimulateConfig.cluster()` and `.cost_model()` turn it into what the event loop runs: a
`ClusterConfig` and a roofline `CostModel` for the model preset on the GPU type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tandem.autoscaler.config import AutoscalerConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.sim.calibrate import load
from tandem.sim.cluster import ClusterConfig
from tandem.sim.costmodel import MODELS, RooflineCostModel, model_shape
from tandem.sim.gpus import GPUS, gpu
from tandem.sim.results import Slo
from tandem.sim.stepmodel import StepModelConfig
from tandem.sim.types import CostModel

TRACE_FORMATS = ("mooncake", "azure", "csv")
VECTORISE_AT_WORKERS = 32  # prefix_aware clusters at least this large route with VectorRouter


@dataclass(frozen=True)
class SimulateConfig:
    trace: Path | None = field(
        default=None, metadata={"help": "trace file: Mooncake JSONL, Azure LLM inference CSV, or plain CSV"}
    )
    trace_format: str | None = field(
        default=None, metadata={"choices": TRACE_FORMATS, "help": "format of --trace (default: from its contents)"}
    )
    workload: Path | None = field(
        default=None, metadata={"help": "a load generator workload YAML (instead of --trace)"}
    )
    num_requests: int = field(default=1000, metadata={"help": "requests drawn from --workload"})
    rate_rps: float = field(default=10.0, metadata={"help": "arrival rate of --workload (Poisson)"})
    seed: int = field(default=0, metadata={"help": "seed of --workload's draws and arrivals"})
    model: str = field(default="llama-3-8b", metadata={"choices": tuple(sorted(MODELS)), "help": "model shapes"})
    gpu: str = field(default="H100", metadata={"choices": tuple(sorted(GPUS)), "help": "GPU type"})
    tp: int = field(default=1, metadata={"help": "GPUs per worker (tensor parallel)"})
    cost_model_file: Path | None = field(
        default=None,
        metadata={
            "help": "a CPU cost model fitted on measured steps (tandem.sim.calibrate JSON) instead of the roofline"
        },
    )
    num_prefill: int = field(default=1, metadata={"help": "prefill workers (0: colocated)"})
    num_decode: int = field(default=1, metadata={"help": "decode workers"})
    max_num_batched_tokens: int = field(default=8192, metadata={"help": "token budget of a step"})
    max_num_seqs: int = field(default=256, metadata={"help": "sequences in a batch, at most"})
    max_prefill_chunk_tokens: int | None = field(default=None, metadata={"help": "chunked prefill cap"})
    num_blocks: int = field(
        default=0, metadata={"help": "KV blocks per worker (0: 90 %% of GPU memory less the weights)"}
    )
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    autoscale: AutoscalerConfig | None = field(
        default=None, metadata={"flag": "autoscale", "help": "scale the pools with the real autoscaler policy"}
    )
    startup_s: float = field(default=30.0, metadata={"help": "a scaled-up worker takes requests after this"})
    slo_ttft_s: float = field(default=1.0, metadata={"help": "TTFT SLO of goodput (seconds)"})
    slo_itl_s: float = field(default=0.1, metadata={"help": "ITL SLO of goodput (seconds)"})
    out: Path | None = field(default=None, metadata={"help": "write the report and plots into this folder"})

    def __post_init__(self) -> None:
        if self.trace is not None and self.workload is not None:
            raise ValueError("give one of --trace (a trace file) and --workload (a workload YAML), not both")
        model_shape(self.model)
        gpu(self.gpu)
        for name in ("tp", "num_requests", "num_decode"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_prefill < 0 or self.num_blocks < 0:
            raise ValueError("num_prefill and num_blocks must be >= 0")
        if not self.rate_rps > 0:
            raise ValueError(f"rate_rps must be > 0, got {self.rate_rps!r}")
        self.slo()

    def slo(self) -> Slo:
        return Slo(self.slo_ttft_s, self.slo_itl_s)

    def cost_model(self) -> CostModel:
        if self.cost_model_file is not None:
            return load(self.cost_model_file)
        return self.roofline()

    def roofline(self) -> RooflineCostModel:
        return RooflineCostModel(model_shape(self.model), gpu(self.gpu), self.tp)

    def cluster(self) -> ClusterConfig:
        if self.cost_model_file is not None and not self.num_blocks:
            raise ValueError("with --cost-model-file, give the workers' KV size with --num-blocks")
        num_blocks = self.num_blocks or self.roofline().kv_capacity_tokens() // self.scheduler.block_size
        if num_blocks < 1:
            raise ValueError(f"{self.model} does not fit in {self.tp} x {self.gpu} memory; raise --tp")
        step = StepModelConfig(
            self.scheduler.block_size,
            self.max_num_batched_tokens,
            self.max_num_seqs,
            self.max_prefill_chunk_tokens,
            num_blocks,
        )
        workers = self.num_prefill + self.num_decode
        if self.autoscale is not None:
            workers = max(workers, self.autoscale.prefill.max_replicas + self.autoscale.decode.max_replicas)
        vectorised = self.scheduler.policy == "prefix_aware" and workers >= VECTORISE_AT_WORKERS
        return ClusterConfig(
            self.num_prefill,
            self.num_decode,
            step,
            self.scheduler,
            autoscaler=self.autoscale,
            startup_s=self.startup_s,
            slo=self.slo(),
            vectorised_routing=vectorised,
        )


@dataclass(frozen=True)
class PlanConfig:
    simulate: SimulateConfig = field(
        default_factory=SimulateConfig,
        metadata={"skip": frozenset({"num_prefill", "num_decode", "autoscale", "startup_s"})},
    )
    attainment: float = field(default=0.9, metadata={"help": "share of requests that must meet both SLOs"})
    max_gpus: int = field(default=8, metadata={"help": "budget: GPUs at most"})
    cost_per_hour_usd: float = field(default=0.0, metadata={"help": "price per GPU-hour (0: the GPU table's)"})

    def price(self) -> float:
        return self.cost_per_hour_usd or gpu(self.simulate.gpu).cost_per_hour_usd
