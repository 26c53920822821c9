"""vLLM's metric set, as every worker exports it (names, types, help texts and buckets copied
from vLLM's `vllm/v1/metrics/loggers.py`, `PrometheusStatLogger`).

Labels: vLLM's `model_name` (the served model name) and `engine` (always "0": one engine per
worker process), plus Tandem's `worker_id` and `role` (`prefill` | `decode`, the pool), so that
a dashboard can select by model as vLLM's do and group by pool as Tandem's do.

Who records what (the worker's `RequestRecorder` and `LoadMeter`, worker/): see
`tandem.worker.request_metrics` for the rule that keeps `sum()` across pools from counting a
disaggregated request twice. This module declares the series. Every method runs on any
thread (prometheus_client is thread-safe), except the per-output ones: a decode step ends
with one generation-token count and one inter-token latency per running request, so
`count_generation_tokens` and `observe_inter_token_latency` only add to a batch on the step
loop's thread, and `flush()` (the worker's tick, once per loop iteration, before the step's
outputs leave that thread) applies it: one increment per bucket touched instead of a lock
and a bucket scan per request and step.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.common.request import FinishReason

# vLLM's bucket lists, verbatim.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# vLLM's `finished_reason` values (str(vllm.v1.engine.FinishReason)); HANDOFF is Tandem's and
# never ends a request, so it is not one of them.
SUCCESS_REASONS = (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT)
ENGINE_INDEX = "0"


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `max_value` included."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        scale *= 10


class VllmMetrics:
    """vLLM's series in `registry`, bound to one worker's labels."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str], max_model_len: int) -> None:
        r, names = registry, list(labels)
        self.labels = labels

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=r).labels(**labels)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=r).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=r).labels(**labels)

        # scheduler state and KV cache
        self.num_requests_running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage_perc = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        # vLLM's deprecated names that its published dashboards still query: set and observed
        # with their successors (`set_kv_cache_usage`, `observe_inter_token_latency`)
        self.gpu_cache_usage_perc = gauge(
            "vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage (deprecated name)."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        # counters
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        success = Counter(
            "vllm:request_success", "Count of successfully processed requests.", [*names, "finished_reason"], registry=r
        )
        self._success = {reason: success.labels(**labels, finished_reason=reason.value) for reason in SUCCESS_REASONS}
        # histograms of counts
        token_buckets = tuple(float(b) for b in build_1_2_5_buckets(max_model_len))
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            tuple(float(b) for b in ITERATION_TOKENS_BUCKETS),
        )
        # histograms of time intervals (seconds)
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (deprecated: inter_token_latency_seconds).",
            ITL_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._registry = r
        # the per-output series' batch (loop thread), applied by `flush`
        self._generation_tokens_batch = 0
        self._itl_batch: list[float] = []

    def set_kv_cache_usage(self, usage: float) -> None:
        self.kv_cache_usage_perc.set(usage)
        self.gpu_cache_usage_perc.set(usage)

    def count_generation_tokens(self, n: int) -> None:
        """Loop thread: `n` tokens sampled; counted in `vllm:generation_tokens_total` by `flush`."""
        self._generation_tokens_batch += n

    def observe_inter_token_latency(self, seconds: float) -> None:
        """Loop thread: one output's inter-token latency, observed (with the deprecated
        `time_per_output_token_seconds`) by `flush`."""
        self._itl_batch.append(seconds)

    def flush(self) -> None:
        """Loop thread: apply the per-output series' batch to the Prometheus values."""
        if self._generation_tokens_batch:
            self.generation_tokens.inc(self._generation_tokens_batch)
            self._generation_tokens_batch = 0
        if self._itl_batch:
            values, self._itl_batch = self._itl_batch, []
            observe_all(values, self.inter_token_latency, self.time_per_output_token)

    def request_success(self, reason: FinishReason) -> None:
        """One request ended on this worker with `reason` (stop, length or abort)."""
        self._success[reason].inc()

    def cache_config(self, block_size: int, num_blocks: int, cache_dtype: str, prefix_caching: bool = True) -> None:
        """vLLM's `vllm:cache_config_info`: a gauge of 1 whose labels are the KV cache's
        configuration (vLLM's label names: `block_size`, `num_gpu_blocks`, `cache_dtype` with
        vLLM's values auto, fp8, fp8_e4m3, fp8_e5m2, `enable_prefix_caching`). Set once, at
        startup."""
        config = {
            "block_size": str(block_size),
            "num_gpu_blocks": str(num_blocks),
            "cache_dtype": cache_dtype,
            "enable_prefix_caching": str(prefix_caching),
        }
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            [*self.labels, *config],
            registry=self._registry,
        )
        info.labels(**self.labels, **config).set(1)


def observe_all(values: list[float], *histograms: Histogram) -> None:
    """`h.observe(v)` for each of `values` in order, on each of `histograms` (which share their
    buckets), as one increment per bucket the values land in and one update of the sum. It
    writes the labelled histograms' values as `Histogram.observe` does (prometheus_client's
    `_upper_bounds`, `_buckets` and `_sum`: a value lands in the first bucket whose upper
    bound is >= it; the sum adds the values one by one, so it is bit-identical). The caller is
    each histogram's only writer (one thread): the sum is read, then set."""
    bounds = histograms[0]._upper_bounds
    if any(h._upper_bounds != bounds for h in histograms):
        raise ValueError("observe_all: the histograms' buckets differ")
    landed: dict[int, int] = {}
    for v in values:
        index = bisect_left(bounds, v)
        landed[index] = landed.get(index, 0) + 1
    for h in histograms:
        for index, count in landed.items():
            h._buckets[index].inc(count)
        total = h._sum.get()
        for v in values:
            total += v
        h._sum.set(total)
