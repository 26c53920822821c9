"""Prometheus metrics of a worker (DESIGN.md section 4, "Metrics").

Each worker owns one `WorkerMetrics` with its own registry (no module-level globals), and
serves it over HTTP on its metrics port in the text format 0.0.4 (`tandem.common.exposition`:
the format that keeps the `vllm:` names through a Prometheus scrape). `vllm` holds vLLM's set
(`tandem.common.vllm_metrics`), the names existing dashboards, alerts and the Gateway API
Inference Extension read, labelled `model_name` (the served model name), `engine` ("0"),
`worker_id` and `role`; the rest use the `tandem_` prefix, labelled `worker_id` and `role`.
"""

from __future__ import annotations

from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.common import exposition
from tandem.common.vllm_metrics import ENGINE_INDEX, VllmMetrics

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    def __init__(self, worker_id: str, role: str, model_name: str, max_model_len: int) -> None:
        """`model_name`: the served model name (vLLM's `model_name` label); `max_model_len`
        bounds vLLM's token-count buckets."""
        if not model_name:
            raise ValueError("model_name must be a non-empty string")
        self.registry = CollectorRegistry()
        labels = {"worker_id": worker_id, "role": role}
        self._labels = labels
        names = list(labels)
        r = self.registry
        vllm_labels = {"model_name": model_name, "engine": ENGINE_INDEX, **labels}
        self._vllm_labels = vllm_labels
        vllm_names = list(vllm_labels)
        self.vllm = VllmMetrics(r, vllm_labels, max_model_len)
        self.num_requests_waiting = self.vllm.num_requests_waiting
        self.num_requests_running = self.vllm.num_requests_running
        self._server: ThreadingHTTPServer | None = None
        # The prefill pool's scaling signal (the autoscaler reads it from Redis, KEDA from here).
        self.queued_prefill_tokens = Gauge(
            "tandem_queued_prefill_tokens", "Prompt tokens waiting to be prefilled", names, registry=r
        ).labels(**labels)
        self.kv_transfer_bytes = Counter("tandem_kv_transfer_bytes", "KV bytes received", names, registry=r).labels(
            **labels
        )
        self.kv_transfer_blocks = Counter("tandem_kv_transfer_blocks", "KV blocks received", names, registry=r).labels(
            **labels
        )
        self.kv_transfer_seconds = Histogram(
            "tandem_kv_transfer_seconds", "KV pull duration", names, buckets=_SECONDS_BUCKETS, registry=r
        ).labels(**labels)
        self._kv_transfer_failures = Counter(
            "tandem_kv_transfer_failures", "Failed KV pulls by reason", [*names, "reason"], registry=r
        )
        # Decode role: successful pulls by the transport that moved them ("shm": same host), and
        # same-host attempts that fell back to the network, by the reason of the failure.
        self._kv_pulls = Counter(
            "tandem_kv_pulls", "Successful KV pulls by transport", [*names, "transport"], registry=r
        )
        self._kv_shm_fallbacks = Counter(
            "tandem_kv_shm_fallbacks", "Same-host KV pulls redone over the network", [*names, "reason"], registry=r
        )
        # Decode role: KV handles not used (their hashes are not the prompt's, or their source
        # is not a registered, compatible prefill worker); each is also a recompute.
        self._kv_handle_rejections = Counter(
            "tandem_kv_handle_rejections",
            "KV handles rejected before any pull, by reason",
            [*names, "reason"],
            registry=r,
        )
        self.kv_local_hit_blocks = Counter(
            "tandem_kv_local_hit_blocks", "Prompt blocks a decode worker found in its own cache", names, registry=r
        ).labels(**labels)
        self.kv_recomputes = Counter(
            "tandem_kv_recomputes", "Hand-offs that fell back to local recompute", names, registry=r
        ).labels(**labels)
        self.lease_expiries = Counter(
            "tandem_lease_expiries", "KV leases that expired unpulled", names, registry=r
        ).labels(**labels)
        self.leases_granted = Counter("tandem_leases_granted", "KV leases granted", names, registry=r).labels(**labels)
        self.requests_finished = Counter(
            "tandem_requests_finished", "Requests finished by reason", [*names, "reason"], registry=r
        )
        self.kv_events_dropped = Counter(
            "tandem_kv_events_dropped", "KV events not published (Redis unreachable, or queue full)", names, registry=r
        ).labels(**labels)
        self.kv_event_resyncs = Counter(
            "tandem_kv_event_resyncs", "Whole block sets republished under a new epoch", names, registry=r
        ).labels(**labels)
        self.prompt_tokens_computed = Counter(
            "tandem_prompt_tokens_computed", "Prompt tokens run through the model", names, registry=r
        ).labels(**labels)
        # Speculative decoding (decode role), vLLM's names: a draft is one sequence's proposal
        # in one step; accepted-per-position counts accepted draft tokens by their position.
        self.spec_decode_num_drafts = Counter(
            "vllm:spec_decode_num_drafts", "Speculative drafts verified", vllm_names, registry=r
        ).labels(**vllm_labels)
        self.spec_decode_num_draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens proposed", vllm_names, registry=r
        ).labels(**vllm_labels)
        self.spec_decode_num_accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", vllm_names, registry=r
        ).labels(**vllm_labels)
        self._spec_accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by draft position",
            [*vllm_names, "position"],
            registry=r,
        )
        # Acceptance-aware draft length (decode role, engine/spec/adaptive.py): draft tokens
        # k_max allowed that the rule did not ask for, a request's decode steps at k = 0 that
        # did not draft, and the probes (k_max drafts at k = 0) that re-measure acceptance.
        self.spec_withheld_draft_tokens = Counter(
            "tandem_spec_withheld_draft_tokens",
            "Draft tokens the acceptance-aware rule did not ask for",
            names,
            registry=r,
        ).labels(**labels)
        self.spec_skipped_steps = Counter(
            "tandem_spec_skipped_steps", "Decode steps of a request at k = 0 that did not probe", names, registry=r
        ).labels(**labels)
        self.spec_probes = Counter(
            "tandem_spec_probes", "Drafts run at k = 0 to re-measure acceptance", names, registry=r
        ).labels(**labels)
        # Set once at startup: what the weights occupy as held (fp8 / int8 plus scales when quantized).
        self.model_weight_bytes = Gauge(
            "tandem_model_weight_bytes", "Resident bytes of the model's weights, as held in memory", names, registry=r
        ).labels(**labels)
        self.prefix_hit_tokens = Counter(
            "tandem_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", names, registry=r
        ).labels(**labels)

    def cache_config(self, block_size: int, num_blocks: int, cache_dtype: str) -> None:
        """vLLM's `vllm:cache_config_info` (see `VllmMetrics.cache_config`). Set once, at startup."""
        self.vllm.cache_config(block_size, num_blocks, cache_dtype)

    def kv_transfer_failure(self, reason: str) -> None:
        self._kv_transfer_failures.labels(**self._labels, reason=reason).inc()

    def kv_pull(self, transport: str, shm_fallback: str) -> None:
        self._kv_pulls.labels(**self._labels, transport=transport).inc()
        if shm_fallback:
            self._kv_shm_fallbacks.labels(**self._labels, reason=shm_fallback).inc()

    def kv_handle_rejected(self, reason: str) -> None:
        self._kv_handle_rejections.labels(**self._labels, reason=reason).inc()

    def spec_accepted_at(self, position: int, count: int) -> None:
        self._spec_accepted_per_pos.labels(**self._vllm_labels, position=str(position)).inc(count)

    def finished(self, reason: str) -> None:
        self.requests_finished.labels(**self._labels, reason=reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on (host, port), text format 0.0.4 whatever the `Accept`
        header (`tandem.common.exposition`); returns the bound port."""
        self._server, bound = exposition.serve(self.registry, host, port)
        return bound

    def render(self) -> tuple[bytes, str]:
        """What `GET /metrics` answers: the body and its content type."""
        return exposition.render(self.registry)
