"""vLLM's per-request series, recorded on the loop thread as each output of a request leaves a step.

Who calls it: a role handler (prefill/server.py, decode/server.py) makes one `RequestRecorder`
per call, at the call's arrival, and subscribes `recorder.wrap(deliver)` on the step loop; the
loop thread then calls it with every output of the request, right after the step that made it
(`now_s` is read there, so the times are the step's, not the asyncio thread's). The
per-output series (generation tokens, inter-token latency) are batched and applied by
`VllmMetrics.flush()` in the worker's tick, before the step's outputs leave the loop thread,
so a client never sees a token before its counts. The step-level
series (`vllm:iteration_tokens_total`, `vllm:num_preemptions_total`) are the `LoadMeter`'s
(load.py), once per step, and so are the gauges (at most every 50 ms while the worker steps).

Which worker records what, so that `sum()` over both pools counts every request once:

- colocated, or a local prefill (D alone): D records every series.
- disaggregated, on the prefill worker P: `prompt_tokens_total`, `prefix_cache_queries_total`,
  `prefix_cache_hits_total`, `time_to_first_token_seconds`, `request_queue_time_seconds`,
  `request_prefill_time_seconds`, and `generation_tokens_total` for the first token. Only a
  request whose first token ends it (P answers without a handle and no D is called) also gets
  the end-of-request series on P.
- disaggregated, on the decode worker D: `generation_tokens_total` for the tokens after the
  first, `inter_token_latency_seconds`, and the end-of-request series:
  `request_success_total`, `e2e_request_latency_seconds`, `request_decode_time_seconds`,
  `request_prompt_tokens`, `request_generation_tokens`. Never the prompt's series, even when
  its hand-off is rejected or fails and it recomputes the prompt (`tandem_kv_recomputes_total`
  counts those).

Definitions (vLLM's, `vllm/v1/metrics/stats.py`), all from this worker's clock:
- arrival: the gRPC call's arrival here. TTFT: arrival until the step that samples the first
  token. Queue time: arrival until the batcher first schedules the request. Prefill time:
  from then until the first token. Decode time: first token until the last one.
  E2E: arrival until the request ends here. On D of a disaggregated request the first token
  came with the call, so its "first token" time is the call's arrival: D's ITL starts with the
  gap from the arrival to D's first output (hand-off and admission included: the gap the
  client sees between tokens 1 and 2), and D's E2E and decode time cover D's part only (the
  gateway's `tandem_e2e_request_latency_seconds` is the client's whole figure).
- ITL: one observation per output after the first token (one per step; a speculative step's
  accepted tokens are one output).
- prompt tokens: the request's prompt length (cached tokens included, as vLLM counts), once,
  when its first token is sampled. Prefix queries: the tokens the admission looked up (the
  prompt plus a migration's replayed output); hits: those found in the cache. One lookup per
  request: a re-admission after a preemption is not counted again.
- success{finished_reason}: stop, length or abort, where the request ended (an abort is a
  cancelled, shed or drained sequence; a request then retried or resumed elsewhere is
  counted again where it ends). `request_generation_tokens`: every output token of the
  request (a migration's replayed ones and P's first token included).
A migration's replay is a new request on its new worker (its prompt tokens counted again).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tandem.common.request import FinishReason
from tandem.common.vllm_metrics import SUCCESS_REASONS, VllmMetrics
from tandem.engine.outputs import RequestOutput


class RequestRecorder:
    """One request's vLLM series on one worker. Loop thread only, after construction."""

    def __init__(
        self,
        metrics: VllmMetrics,
        arrival_s: float,
        num_prompt_tokens: int,
        num_prior_output_tokens: int = 0,
        prefilled_elsewhere: bool = False,
        max_tokens: int | None = None,
    ) -> None:
        """`arrival_s`: the call's arrival (`time.monotonic()`). `num_prompt_tokens`: the
        request's prompt (a replay's output excluded). `num_prior_output_tokens`: output tokens
        the request had on arrival (a migration's replay, and the first token a prefill worker
        sampled). `prefilled_elsewhere`: a prefill worker ran the prompt and sampled the first
        token (D of a disaggregated request). `max_tokens`: the request's sampling parameter
        (vLLM's `request_max_num_generation_tokens`, recorded where the request ends)."""
        self._m = metrics
        self._arrival_s = arrival_s
        self._num_prompt_tokens = num_prompt_tokens
        self._num_prior = num_prior_output_tokens
        self._prompt_recorded = prefilled_elsewhere
        self._num_output = 0  # tokens this worker produced for the request
        self._max_tokens = max_tokens
        first_token_s = arrival_s if prefilled_elsewhere else None
        self._first_token_s, self._last_token_s = first_token_s, first_token_s

    def wrap(self, deliver: Callable[[RequestOutput], None]) -> Callable[[RequestOutput], None]:
        """The step-loop subscriber: record `out`, then hand it on to `deliver`."""

        def record_then_deliver(out: RequestOutput) -> None:
            self.record(out, time.monotonic())
            deliver(out)

        return record_then_deliver

    def record(self, out: RequestOutput, now_s: float) -> None:
        """One output of the request, produced at `now_s` (monotonic seconds)."""
        m, n = self._m, len(out.new_token_ids)
        reason = out.finish_reason
        if not self._prompt_recorded and (n or reason in (FinishReason.STOP, FinishReason.LENGTH)):
            self._record_prompt(out, now_s)
        if n:
            m.count_generation_tokens(n)
            self._num_output += n
            if self._last_token_s is None:
                self._first_token_s = now_s
                m.time_to_first_token.observe(max(0.0, now_s - self._arrival_s))
                if out.first_scheduled_s is not None:
                    m.request_prefill_time.observe(max(0.0, now_s - out.first_scheduled_s))
            else:
                m.observe_inter_token_latency(max(0.0, now_s - self._last_token_s))
            self._last_token_s = now_s
        if reason in SUCCESS_REASONS:
            assert reason is not None
            m.request_success(reason)
            m.e2e_request_latency.observe(max(0.0, now_s - self._arrival_s))
            m.request_prompt_tokens.observe(self._num_prompt_tokens)
            m.request_generation_tokens.observe(self._num_prior + self._num_output)
            if self._max_tokens is not None:
                m.request_max_num_generation_tokens.observe(self._max_tokens)
            if self._first_token_s is not None and self._last_token_s is not None:
                m.request_decode_time.observe(self._last_token_s - self._first_token_s)

    def _record_prompt(self, out: RequestOutput, now_s: float) -> None:
        """The prompt ran here: its tokens, its prefix lookup and its time in the queue."""
        m = self._m
        self._prompt_recorded = True
        m.prompt_tokens.inc(self._num_prompt_tokens)
        m.prefix_cache_queries.inc(self._num_prompt_tokens + self._num_prior)
        m.prefix_cache_hits.inc(out.num_cached_tokens)
        scheduled_s = out.first_scheduled_s if out.first_scheduled_s is not None else now_s
        m.request_queue_time.observe(max(0.0, scheduled_s - self._arrival_s))
