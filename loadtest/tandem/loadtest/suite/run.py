"""Run the benchmark set and write BENCHMARKS.md (see the package docstring).

Sections run in the order below, one at a time. Each starts from the same process state: its
torch thread count and CPU affinity are restored afterwards, whatever it changed. A section
that raises is recorded as failed, with its traceback, and the run goes on.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tandem.loadtest.cost import GpuHourCost
from tandem.loadtest.suite.context import DEFAULT_GPU_HOUR_COST, BenchContext, write_bench_model
from tandem.loadtest.suite.figures import Section
from tandem.loadtest.suite.machine import MachineInfo
from tandem.loadtest.suite.markdown import render

# key -> (title, module); the module's `run(ctx) -> Section` measures it.
SECTIONS: dict[str, tuple[str, str]] = {
    "engine": ("Engine vs transformers generate", "tandem.loadtest.suite.engine"),
    "kv": ("KV hand-off vs raw loopback TCP", "tandem.loadtest.suite.kv"),
    "stack": ("Full stack through the gateway vs the in-process engine", "tandem.loadtest.suite.stack"),
    "routing": ("Prefix-aware vs round-robin routing", "tandem.loadtest.suite.routing"),
    "routing_zipf": ("Routing under Zipf popularity and small caches", "tandem.loadtest.suite.routing_zipf"),
    "prefix_cache": ("Prefix-cache TTFT speedup", "tandem.loadtest.suite.prefix_cache"),
    "interference": ("Disaggregated vs colocated: decode ITL under long prompts", "tandem.loadtest.suite.interference"),
    "gateway": ("Gateway SSE headroom and scheduler decision latency", "tandem.loadtest.suite.gateway"),
    "overload": ("Overload sweep: goodput under admission control", "tandem.loadtest.suite.overload"),
    "structured": ("Structured output: JSON-schema decode and compile time", "tandem.loadtest.suite.structured"),
    "quantization": ("Quantized serving: FP8 KV cache and quantized weights", "tandem.loadtest.suite.quantization"),
    "speculative": ("Speculative decoding: n-gram and draft model", "tandem.loadtest.suite.speculative"),
    "sim_scale": ("Simulator speed at 1,000 GPUs", "tandem.loadtest.suite.sim_scale"),
    "sim_validate": ("Simulator vs the real cluster", "tandem.loadtest.suite.sim_validate"),
}
REPO_ROOT = Path(__file__).resolve().parents[4]


def parse_only(text: str | None) -> tuple[str, ...]:
    """`--only a,b` as section keys in run order; ValueError naming an unknown key."""
    if text is None:
        return tuple(SECTIONS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SECTIONS]
    if unknown or not keys:
        raise ValueError(f"--only takes a comma list of {', '.join(SECTIONS)}; got {text!r}")
    return tuple(k for k in SECTIONS if k in keys)


def _run_one(key: str, ctx: BenchContext) -> Section:
    title, module = SECTIONS[key]
    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    started = time.perf_counter()
    try:
        section = importlib.import_module(module).run(ctx)
    except Exception:
        section = Section(key, title, "", error=traceback.format_exc(limit=8))
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, cpus)
    return dataclasses.replace(section, key=key, title=title, duration_s=time.perf_counter() - started)


def run_suite(
    out_path: Path,
    only: Sequence[str],
    quick: bool = False,
    log: Callable[[str], None] = print,
    gpu_hour_cost: GpuHourCost = DEFAULT_GPU_HOUR_COST,
) -> int:
    """Run the sections, write `out_path`; 0, or 1 if any section failed (misses are not failures)."""
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    machine = MachineInfo.collect(REPO_ROOT)
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as work:
        ctx = BenchContext(write_bench_model(Path(work)), Path(work), log, quick, gpu_hour_cost)
        for key in only:
            log(f"== {SECTIONS[key][0]}")
            section = _run_one(key, ctx)
            sections.append(section)
            for figure in section.figures:
                log(f"   {figure.name}: {figure.value:.3f} {figure.goal_text()} {figure.verdict()}")
            if section.error:
                log(f"   FAILED after {section.duration_s:.0f} s:\n{section.error}")
            else:
                log(f"   ({section.duration_s:.0f} s)")
    text = render(sections, machine, started.strftime("%Y-%m-%d %H:%M UTC"), time.perf_counter() - t0, quick)
    out_path.write_text(text)
    log(f"wrote {out_path}")
    return 1 if any(s.error for s in sections) else 0
