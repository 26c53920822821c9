"""Tandem's load generator: an OpenAI-compatible benchmark client (like `vllm bench serve`).

Modules, one noun each:

- `record`: `RequestRecord`, the timings of one request as the client saw them.
- `slo`: `SLO`, latency objectives parsed from `ttft=200,tpot=50` (milliseconds).
- `metrics`: percentiles and `summarize()` -> `Summary` (latency percentiles, throughput, goodput).
- `request`: `WorkloadRequest`, one request to send (prompt token ids, output length, chat messages).
- `workloads`: deterministic request generators loaded from YAML (`loadtest/tandem/loadtest/workloads/*.yaml`).
- `arrivals`: when each request is sent (Poisson, constant, bursty) or a fixed concurrency.
- `client`: the asyncio streaming HTTP client that produces `RequestRecord`s.
- `runner`: sends a workload's requests under a load shape and collects their records.
- `report`: `results.json` (every request, for re-analysis), `summary.md` and the side-by-side
  comparison of several runs.
- `plots`: `latency_cdf.png` and `throughput.png` (matplotlib, Agg canvas).
- `__main__`: the `python -m tandem.loadtest run | summarize | compare | bench` command line.

Packages:

- `bench`: the single benchmarks behind `tandem bench engine|gateway|kernels|kv`.
- `suite`: `make bench`, the benchmark set written to BENCHMARKS.md.
"""
