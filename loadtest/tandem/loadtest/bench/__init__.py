"""The single benchmarks behind `tandem bench engine|gateway|kernels|kv`, out of the product packages.

Each prints ratios measured in one run; `tandem.loadtest.suite` (`make bench`) reuses their
measurements as sections of BENCHMARKS.md. They may import the product packages; no product
package imports them.

- `engine`: decode tokens/s of the engine at concurrency 1, 8 and 32 against transformers `generate`.
- `gateway`: streaming tokens/s through the gateway against the decode worker directly.
- `scheduler`: the scheduler's decision latency in memory (printed by `tandem bench gateway`).
- `kv`: KV hand-off MB/s of each transport against raw loopback TCP.
- `kv_source`: the KV source process that `kv` and the KV transfer tests pull from.
- `kernels`: decode-attention bandwidth on CUDA.

Every process they start is a `tandem.launcher.processes.ChildProcess`, as for `tandem up`.
"""
