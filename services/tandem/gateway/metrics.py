"""Prometheus metrics of the gateway (DESIGN.md section 4, "Metrics").

Each gateway process owns one `GatewayMetrics` with its own registry (no module-level
globals) and serves `render()` at `/metrics`. Every series carries `model_name`.

Histograms (seconds; buckets `SECONDS_BUCKETS`, 1 ms to 60 s):
- `tandem_time_to_first_token_seconds`: request arrival at the gateway until the first token
  is sent to the client (TTFT).
- `tandem_inter_token_latency_seconds`: gap between consecutive tokens sent to the client (ITL).
- `tandem_e2e_request_latency_seconds`: arrival until the last byte of the response.
- `tandem_ttft_stage_seconds{stage}`: TTFT broken down by stage: `route` (scheduler pick),
  `prefill_queue` (waiting on the prefill worker), `prefill_compute` (prompt forward pass and
  first sample), `transfer` (KV pull to the decode worker), `decode_admission` (until the
  decode worker's batch takes the sequence). A local prefill (the decode worker alone) has
  `decode_admission` (its wait for the batch) and `prefill_compute`, measured here: from the
  submission of the decode call until its first message, less the worker's admission wait
  (so it includes the round trip to the worker).

Counters:
- `tandem_routing_decisions_total{kind,policy}`: routed requests; `kind` is `disaggregated`
  (prefill worker + decode worker) or `local_prefill` (decode worker alone), `policy` the
  routing policy's name.
- `tandem_requests_total{endpoint,status}`: finished HTTP requests by endpoint path and HTTP
  status code.
- `tandem_prompt_tokens_total`, `tandem_generation_tokens_total`: tokens (prompt, generated).
- `tandem_prefix_cache_query_tokens_total`, `tandem_prefix_cache_hit_tokens_total`: prompt
  tokens looked up in the cluster's prefix index at routing time, and how many of them the
  chosen worker already held. The windowed hit ratio is `rate(hit) / rate(query)`.
  (Workers export a `tandem_prefix_cache_hit_tokens_total` too, labelled `worker_id` and `role`
  and counting their own cache hits: select by label or job when summing.)
- `tandem_prefill_retries_total`: prefill calls retried on another worker (DESIGN section 2.7).
- `tandem_client_disconnects_total`: requests whose client went away before the end.
- `tandem_migrations_total{reason}`: choices resumed on another decode worker after their
  stream failed mid-way (DESIGN section 2.7); `reason` is `worker_failed` (the stream broke),
  `stalled` (no message within the decode idle timeout) or `draining` (a draining worker ended
  it at its drain deadline).
- `tandem_migration_replayed_tokens_total`: tokens the migrations replayed (each migrated
  choice's prompt plus the tokens already sent), whether the new worker had them cached or not.
- `tandem_admission_refusals_total{reason}`: requests refused at admission (admission.py):
  `key` (429, the API key's bound), `inflight` (503, the fixed bound), `limit` (503, the
  adaptive limit), `ttft` (503, the pools cannot start it within its TTFT budget).
- `tandem_slow_client_aborts_total`: streaming requests aborted because their client stopped
  reading and its bounded buffer stayed full (counted as status 408 in `tandem_requests_total`).

Gauges:
- `tandem_prefix_cache_hit_ratio`: hit / query tokens since the process started, in [0, 1]
  (0 before any query), updated on every `prefix()` call.
- `tandem_queue_depth{pool}`: sum of the waiting requests of the pool's live workers, as last
  read from Redis; `pool` is `prefill` or `decode`. The autoscaler's signal.
- `tandem_workers{pool}`: number of live workers in the pool.
- `tandem_admitted_requests`: requests this gateway admitted that have not ended.
- `tandem_admission_limit`: the adaptive limit on them (concurrency_limit.py; 0 when it is off).
- `tandem_routing_mode{mode}`: 1 for the scheduler's current routing mode, 0 for the others
  (`tandem.common.gateway_view.RoutingMode`: `exact`, `degraded` when a worker's KV events
  show a seq gap, `load_only` when the prefix index is empty), set on each scrape.

Who calls it: the gateway's request pipeline (observations) and its cluster-state poller
(`set_pools`), all on the gateway's event loop. The object is not shared across processes.
Every method raises ValueError on a value that can only come from a bug (negative durations or
counts, unknown stage/kind/pool), rather than recording garbage.
"""

from __future__ import annotations

import enum
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.common import exposition
from tandem.common.gateway_view import RoutingMode

SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip

ADMISSION_REASONS = ("key", "inflight", "limit", "ttft")


class TTFTStage(str, enum.Enum):
    ROUTE = "route"
    PREFILL_QUEUE = "prefill_queue"
    PREFILL_COMPUTE = "prefill_compute"
    TRANSFER = "transfer"
    DECODE_ADMISSION = "decode_admission"


class RoutingKind(str, enum.Enum):
    DISAGGREGATED = "disaggregated"
    LOCAL_PREFILL = "local_prefill"


class MigrationReason(str, enum.Enum):
    WORKER_FAILED = "worker_failed"
    STALLED = "stalled"
    DRAINING = "draining"


class Pool(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


def _check_seconds(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _check_count(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise ValueError("model_name must be a non-empty string")
        self.registry = CollectorRegistry()
        r = self.registry
        self._model = {"model_name": model_name}
        base = ["model_name"]

        def histogram(name: str, doc: str, extra: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, [*base, *extra], buckets=SECONDS_BUCKETS, registry=r)

        self._ttft = histogram("tandem_time_to_first_token_seconds", "Time to first token").labels(**self._model)
        self._itl = histogram("tandem_inter_token_latency_seconds", "Time between tokens").labels(**self._model)
        self._e2e = histogram("tandem_e2e_request_latency_seconds", "End-to-end request latency").labels(**self._model)
        self._stage = histogram("tandem_ttft_stage_seconds", "Time to first token by stage", ("stage",))
        self._routing = Counter(
            "tandem_routing_decisions_total",
            "Routing decisions by kind and policy",
            [*base, "kind", "policy"],
            registry=r,
        )
        self._requests = Counter(
            "tandem_requests_total",
            "Finished HTTP requests by endpoint and status",
            [*base, "endpoint", "status"],
            registry=r,
        )
        self._prompt_tokens = Counter("tandem_prompt_tokens_total", "Prompt tokens", base, registry=r).labels(
            **self._model
        )
        self._generation_tokens = Counter(
            "tandem_generation_tokens_total", "Generated tokens", base, registry=r
        ).labels(**self._model)
        self._prefix_query = Counter(
            "tandem_prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix index", base, registry=r
        ).labels(**self._model)
        self._prefix_hit = Counter(
            "tandem_prefix_cache_hit_tokens_total", "Prompt tokens the routed worker had cached", base, registry=r
        ).labels(**self._model)
        self._prefix_ratio = Gauge(
            "tandem_prefix_cache_hit_ratio", "Prefix cache hit tokens / query tokens since start", base, registry=r
        ).labels(**self._model)
        self._prefill_retries = Counter(
            "tandem_prefill_retries_total", "Prefill calls retried on another worker", base, registry=r
        ).labels(**self._model)
        self._disconnects = Counter(
            "tandem_client_disconnects_total", "Requests abandoned by their client", base, registry=r
        ).labels(**self._model)
        self._migrations = Counter(
            "tandem_migrations_total", "Choices resumed on another decode worker", [*base, "reason"], registry=r
        )
        self._replayed_tokens = Counter(
            "tandem_migration_replayed_tokens_total", "Tokens replayed by migrations", base, registry=r
        ).labels(**self._model)
        self._slow_clients = Counter(
            "tandem_slow_client_aborts_total", "Requests aborted because their client stopped reading", base, registry=r
        ).labels(**self._model)
        self._refusals = Counter(
            "tandem_admission_refusals_total", "Requests refused at admission by reason", [*base, "reason"], registry=r
        )
        self._admitted = Gauge("tandem_admitted_requests", "Admitted requests in flight", base, registry=r).labels(
            **self._model
        )
        self._admission_limit = Gauge(
            "tandem_admission_limit", "Adaptive limit on admitted requests in flight", base, registry=r
        ).labels(**self._model)
        self._rate_limit_fail_open = Counter(
            "tandem_rate_limit_fail_open_total",
            "Requests let through unchecked because the rate limiter's Redis was unreachable",
            base,
            registry=r,
        ).labels(**self._model)
        self._guardrail_actions = Counter(
            "tandem_guardrail_actions_total",
            "Actions of the guardrail hooks: reject, rewrite (input), redact (a span), stop (output)",
            [*base, "guardrail", "action"],
            registry=r,
        )
        self._queue_depth = Gauge("tandem_queue_depth", "Waiting requests by pool", [*base, "pool"], registry=r)
        self._workers = Gauge("tandem_workers", "Live workers by pool", [*base, "pool"], registry=r)
        self._routing_mode = Gauge(
            "tandem_routing_mode", "1 for the current routing mode, 0 for the others", [*base, "mode"], registry=r
        )
        # Running totals behind the ratio gauge (the counters' values are not public API).
        self._prefix_query_total = 0
        self._prefix_hit_total = 0
        # Fixed label sets are created up front, so dashboards see zeros, not gaps.
        for stage in TTFTStage:
            self._stage.labels(**self._model, stage=stage.value)
        for reason in ADMISSION_REASONS:
            self._refusals.labels(**self._model, reason=reason)
        for pool in Pool:
            self._queue_depth.labels(**self._model, pool=pool.value)
            self._workers.labels(**self._model, pool=pool.value)
        self.set_routing_mode(RoutingMode.LOAD_ONLY)  # an empty index, until the first scrape

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(_check_seconds(seconds))

    def observe_itl(self, seconds: float) -> None:
        self._itl.observe(_check_seconds(seconds))

    def observe_e2e(self, seconds: float) -> None:
        self._e2e.observe(_check_seconds(seconds))

    def observe_stage(self, stage: TTFTStage | str, seconds: float) -> None:
        """One TTFT stage of one request; `stage` is a `TTFTStage` or its value."""
        self._stage.labels(**self._model, stage=TTFTStage(stage).value).observe(_check_seconds(seconds))

    def routed(self, kind: RoutingKind | str, policy: str) -> None:
        """One routing decision; `kind` is a `RoutingKind` or its value."""
        if not isinstance(policy, str) or not policy:
            raise ValueError("policy must be a non-empty string")
        self._routing.labels(**self._model, kind=RoutingKind(kind).value, policy=policy).inc()

    def request_done(self, endpoint: str, status: int) -> None:
        """One finished HTTP request: `endpoint` is the route's path template (e.g.
        `/v1/completions`; never the raw URL of an unknown path, which would let clients
        create series at will) and `status` the HTTP status code sent."""
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status code, got {status!r}")
        self._requests.labels(**self._model, endpoint=endpoint, status=str(status)).inc()

    def tokens(self, prompt: int, generated: int) -> None:
        _check_count(prompt=prompt, generated=generated)
        self._prompt_tokens.inc(prompt)
        self._generation_tokens.inc(generated)

    def prefix(self, query_tokens: int, hit_tokens: int) -> None:
        """One prefix lookup at routing time: `hit_tokens` of `query_tokens` were cached."""
        _check_count(query_tokens=query_tokens, hit_tokens=hit_tokens)
        if hit_tokens > query_tokens:
            raise ValueError(f"hit_tokens ({hit_tokens}) must be <= query_tokens ({query_tokens})")
        self._prefix_query.inc(query_tokens)
        self._prefix_hit.inc(hit_tokens)
        self._prefix_query_total += query_tokens
        self._prefix_hit_total += hit_tokens
        if self._prefix_query_total:
            self._prefix_ratio.set(self._prefix_hit_total / self._prefix_query_total)

    def prefill_retry(self) -> None:
        self._prefill_retries.inc()

    def client_disconnect(self) -> None:
        self._disconnects.inc()

    def migrated(self, reason: MigrationReason | str, replayed_tokens: int) -> None:
        _check_count(replayed_tokens=replayed_tokens)
        self._migrations.labels(**self._model, reason=MigrationReason(reason).value).inc()
        self._replayed_tokens.inc(replayed_tokens)

    def admission_refused(self, reason: str) -> None:
        if reason not in ADMISSION_REASONS:
            raise ValueError(f"unknown admission refusal reason {reason!r}")
        self._refusals.labels(**self._model, reason=reason).inc()

    def set_admitted(self, inflight: int) -> None:
        _check_count(inflight=inflight)
        self._admitted.set(inflight)

    def set_admission_limit(self, limit: int) -> None:
        _check_count(limit=limit)
        self._admission_limit.set(limit)

    def guardrail_action(self, guardrail: str, action: str) -> None:
        self._guardrail_actions.labels(**self._model, guardrail=guardrail, action=action).inc()

    def slow_client_abort(self) -> None:
        self._slow_clients.inc()

    def rate_limit_fail_open(self) -> None:
        self._rate_limit_fail_open.inc()

    def set_pools(self, prefill_waiting: int, decode_waiting: int, num_prefill: int, num_decode: int) -> None:
        """The pools as last read from Redis: waiting requests summed over each pool's workers,
        and the number of live workers in each."""
        _check_count(
            prefill_waiting=prefill_waiting,
            decode_waiting=decode_waiting,
            num_prefill=num_prefill,
            num_decode=num_decode,
        )
        for pool, waiting, workers in (
            (Pool.PREFILL, prefill_waiting, num_prefill),
            (Pool.DECODE, decode_waiting, num_decode),
        ):
            self._queue_depth.labels(**self._model, pool=pool.value).set(waiting)
            self._workers.labels(**self._model, pool=pool.value).set(workers)

    def set_routing_mode(self, mode: RoutingMode | str) -> None:
        """The scheduler's routing mode: its series 1, the others 0."""
        current = RoutingMode(mode)
        for m in RoutingMode:
            self._routing_mode.labels(**self._model, mode=m.value).set(1 if m is current else 0)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition 0.0.4 of every metric (names with a colon kept, whatever
        the scraper's Accept header: `tandem.common.exposition`), and its content type."""
        return exposition.render(self.registry)
