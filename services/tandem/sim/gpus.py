"""The GPU types the simulator and the planner know, with where each figure comes from.

Every figure is per GPU (one die package as sold: an SXM module or a PCIe card):

- `peak_flops`: dense BF16 tensor-core FLOP/s, without 2:4 structured sparsity. NVIDIA's
  datasheets print the sparse figure with an asterisk; the dense figure is half of it.
- `mem_bandwidth`: peak HBM (or GDDR) bandwidth in bytes/s, as printed (TB/s = 1e12 bytes/s).
- `memory_bytes`: memory size as printed, in decimal bytes (80 GB = 80e9 bytes).
- `cost_per_hour_usd`: an indicative on-demand cloud price per GPU-hour, for comparing layouts
  only. Prices vary by provider and contract; pass your own to the planner for real decisions.

The roofline cost model (`tandem.sim.costmodel`) multiplies the peaks by an achievable fraction
(MFU, MBU): no kernel reaches a datasheet peak.
"""

from __future__ import annotations

import types
from collections.abc import Mapping

from tandem.sim.types import GpuSpec

_TB = 1e12
_GB = 1e9
_PRICE = "indicative on-demand cloud price per GPU-hour (2026), not from a datasheet"

GPUS: Mapping[str, GpuSpec] = types.MappingProxyType(
    {
        spec.name: spec
        for spec in (
            GpuSpec(
                name="A100",
                peak_flops=312e12,
                mem_bandwidth=2.039 * _TB,
                memory_bytes=int(80 * _GB),
                cost_per_hour_usd=1.80,
                source="NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: BF16 312 TFLOPS dense "
                "(624 with sparsity), HBM2e 2,039 GB/s, 80 GB; price: " + _PRICE,
            ),
            GpuSpec(
                name="H100",
                peak_flops=989e12,
                mem_bandwidth=3.35 * _TB,
                memory_bytes=int(80 * _GB),
                cost_per_hour_usd=2.50,
                source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity "
                "(989 dense), HBM3 3.35 TB/s, 80 GB; price: " + _PRICE,
            ),
            GpuSpec(
                name="H200",
                peak_flops=989e12,
                mem_bandwidth=4.8 * _TB,
                memory_bytes=int(141 * _GB),
                cost_per_hour_usd=3.50,
                source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 1,979 TFLOPS with sparsity "
                "(989 dense), HBM3e 4.8 TB/s, 141 GB; price: " + _PRICE,
            ),
            GpuSpec(
                name="L40S",
                peak_flops=362.05e12,
                mem_bandwidth=864 * _GB,
                memory_bytes=int(48 * _GB),
                cost_per_hour_usd=1.00,
                source="NVIDIA L40S GPU datasheet: BF16 733 TFLOPS with sparsity (362.05 dense), "
                "GDDR6 864 GB/s, 48 GB; price: " + _PRICE,
            ),
            GpuSpec(
                name="B200",
                peak_flops=2.25e15,
                mem_bandwidth=8.0 * _TB,
                memory_bytes=int(180 * _GB),
                cost_per_hour_usd=5.00,
                source="NVIDIA HGX B200 datasheet (per GPU of 8, 1,000 W): BF16 4.5 PFLOPS with sparsity "
                "(2.25 dense), HBM3e 8 TB/s, 180 GB (1,440 GB per 8 GPUs); price: " + _PRICE,
            ),
        )
    }
)


def gpu(name: str) -> GpuSpec:
    """The GPU type called `name` (case-insensitive, e.g. `h100`); ValueError lists the known ones."""
    for known, spec in GPUS.items():
        if known.lower() == name.strip().lower():
            return spec
    raise ValueError(f"Unknown GPU type {name!r}; known: {', '.join(sorted(GPUS))}.")
