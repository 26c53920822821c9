"""What every section gets: the models, a log, the size of the run, and a way to drive load.

The serving sections use the *bench model*: the tiny model's tokenizer with a larger Llama
config (below), generated on this machine like the tiny model (nothing is downloaded). On the
tiny model (hidden 64, 2 layers) a 1024-token prefill costs about as much as the HTTP and
gRPC work around it, so TTFT ratios would measure overheads rather than the effects they are
meant to show. This one makes a 1024-token prefill cost ~0.3 s on one core, against a
~10 ms decode step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.loadtest.arrivals import LoadShape
from tandem.loadtest.client import ClientConfig, StreamingClient
from tandem.loadtest.cost import GpuHourCost
from tandem.loadtest.request import WorkloadRequest
from tandem.loadtest.runner import RunClock, RunResult, run_load

BENCH_MODEL_NAME = "bench-llama-v1"
# the chart's default (monitoring.gpuHourCost): an indicative on-demand H100 price per GPU-hour
DEFAULT_GPU_HOUR_COST = GpuHourCost((("prefill", 2.5), ("decode", 2.5)))
BENCH_MODEL_OVERRIDES: Mapping[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}


def write_bench_model(root: Path) -> Path:
    """Generate the bench model under `root` (deterministic: seed 0) and return its directory."""
    from tandem.engine.tiny_model import write_tiny_llama

    path = root / BENCH_MODEL_NAME
    if not path.is_dir():
        path.mkdir(parents=True)
        write_tiny_llama(path, seed=0, overrides=BENCH_MODEL_OVERRIDES)
    return path


@dataclass(frozen=True)
class BenchContext:
    """Shared by all sections. `quick` shrinks every section (for tests of the suite itself);
    figures of a quick run are not the project's figures."""

    model_dir: Path
    work_dir: Path
    log: Callable[[str], None]
    quick: bool = False
    # the price of each worker's GPU per hour, by pool (`--gpu-hour-cost`): the cost figures
    gpu_hour_cost: GpuHourCost = DEFAULT_GPU_HOUR_COST

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def drive(
    url: str, model: str, requests: Sequence[WorkloadRequest], shape: LoadShape, seed: int = 0, timeout_s: float = 300.0
) -> RunResult:
    """Send `requests` to the gateway at `url` under `shape` with the load generator."""
    return drive_streams(url, model, [(requests, shape)], seed, timeout_s)[0]


def drive_streams(
    url: str,
    model: str,
    streams: Sequence[tuple[Sequence[WorkloadRequest], LoadShape]],
    seed: int = 0,
    timeout_s: float = 300.0,
) -> list[RunResult]:
    """Run several request streams at once, each under its own load shape, on one client and one
    run clock (so their records share a time axis). Every failed or short request is an error
    here: a benchmark of a failing system measures nothing."""
    config = ClientConfig(url, model, timeout_s=timeout_s)
    clock = RunClock()

    async def main() -> list[RunResult]:
        async with StreamingClient(config, clock=clock) as client:
            return list(
                await asyncio.gather(*(run_load(client, requests, shape, seed, clock) for requests, shape in streams))
            )

    results = asyncio.run(main())
    for (requests, _), result in zip(streams, results):
        max_tokens = {r.request_id: r.max_tokens for r in requests}
        failed = [r for r in result.records if not r.ok]
        if failed:
            first = failed[0]
            raise RuntimeError(
                f"{len(failed)} of {len(result.records)} requests failed; first: {first.request_id} "
                f"{first.error.value if first.error else ''} {first.error_message}"
            )
        short = [r.request_id for r in result.records if r.output_tokens != max_tokens[r.request_id]]
        if short:
            raise RuntimeError(
                f"requests {short[:5]} returned another number of tokens than max_tokens (ignore_eos was sent)"
            )
    return results
