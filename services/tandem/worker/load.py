"""A worker's load as the rest of the cluster sees it: the heartbeat's `WorkerLoad` and the
Prometheus gauges and counters that mirror the engine.

Who calls it: the step-loop tick (`Worker._tick`) and the Health/Drain handlers (through the
step loop), so every method runs on the loop thread; `latest` may be read from any thread
(the heartbeat thread reads it; a reference swap, never a torn value).
"""

from __future__ import annotations

import time

from prometheus_client import Counter

from tandem.common.metrics import WorkerMetrics
from tandem.common.workers import WorkerLoad
from tandem.engine.engine import Engine


class LoadMeter:
    def __init__(self, metrics: WorkerMetrics, num_blocks: int) -> None:
        self.metrics = metrics
        self.latest = WorkerLoad(0, 0, 0, 0, num_blocks, time.time())
        # what the Prometheus counters already hold of the engine's and the speculator's counters:
        self._counted: tuple[int, ...] = (0, 0)  # prompt tokens computed, prefix hit tokens
        self._spec_counted: tuple[int, ...] = (0, 0, 0)  # drafts, draft tokens, accepted tokens
        self._spec_per_position: list[int] = []  # accepted tokens per draft position
        self._adaptive_counted: tuple[int, ...] = (0, 0, 0)  # withheld tokens, skipped steps, probes
        self._steps_counted = (0, 0, 0)  # engine (steps, computed tokens, preemptions) already counted

    def snapshot(self, engine: Engine) -> WorkerLoad:
        """Loop thread: current load, kept for the heartbeat and mirrored in the gauges."""
        waiting = engine.batcher.waiting
        running = engine.batcher.running
        queued = sum(s.num_new_tokens for s in waiting) + sum(
            s.num_new_tokens - 1 for s in running if s.num_new_tokens > 1
        )
        pool = engine.pool
        num_waiting = engine.num_waiting  # also reserved (pulling) and pulled hand-offs: what max_waiting bounds
        stats = engine.stats
        load = WorkerLoad(
            num_waiting,
            len(running),
            queued,
            pool.num_used_blocks,
            pool.num_blocks,
            time.time(),
            spec_draft_tokens=stats.spec_num_draft_tokens,
            spec_accepted_tokens=stats.spec_num_accepted_tokens,
        )
        self.latest = load
        self.metrics.num_requests_waiting.set(num_waiting)
        self.metrics.num_requests_running.set(len(running))
        self.metrics.queued_prefill_tokens.set(queued)
        self.metrics.vllm.set_kv_cache_usage(pool.usage)
        return load

    def count_prompt_tokens(self, engine: Engine) -> None:
        """Loop thread: mirror the engine's prompt-token counters into the Prometheus counters."""
        stats = engine.stats
        computed, hits = stats.num_prompt_tokens_computed, stats.num_prefix_hit_tokens
        self._counted = _mirror(
            (self.metrics.prompt_tokens_computed, self.metrics.prefix_hit_tokens), (computed, hits), self._counted
        )

    def count_speculation(self, engine: Engine) -> None:
        """Loop thread, after every step: mirror the engine's speculative-decoding counters into
        vLLM's `vllm:spec_decode_*` counters, and the speculator's `AdaptiveCounters` into the
        `tandem_spec_*` counters. Returns at once when nothing changed (no speculator, or no
        draft verified and no draft length decided since the last call)."""
        speculator = engine.speculator
        if speculator is None:
            return
        stats = engine.stats
        m = self.metrics
        # verification.py increments the three together, and the per-position counts only with
        # them; the first call also shows every draft position's series, at 0
        per_position = stats.spec_accepted_per_position
        if stats.spec_num_drafts != self._spec_counted[0] or len(per_position) != len(self._spec_per_position):
            self._spec_counted = _mirror(
                (m.spec_decode_num_drafts, m.spec_decode_num_draft_tokens, m.spec_decode_num_accepted_tokens),
                (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens),
                self._spec_counted,
            )
            for position, value in enumerate(per_position):
                counted = self._spec_per_position[position] if position < len(self._spec_per_position) else 0
                m.spec_accepted_at(position, value - counted)  # a zero still shows the position's series
            self._spec_per_position = list(per_position)
        c = speculator.counters
        adaptive = (c.withheld_tokens, c.skipped_steps, c.probes)
        if adaptive != self._adaptive_counted:
            self._adaptive_counted = _mirror(
                (m.spec_withheld_draft_tokens, m.spec_skipped_steps, m.spec_probes), adaptive, self._adaptive_counted
            )

    def count_steps(self, engine: Engine) -> None:
        """Loop thread, once per loop iteration (at most one step since the last call): vLLM's
        `vllm:iteration_tokens_total` (the tokens the step ran through the model: prompt chunks,
        decode tokens and verified drafts; a prefix-cache hit runs none) and
        `vllm:num_preemptions_total` (sequences the batcher preempted for room)."""
        stats = engine.stats
        steps, computed, preemptions = self._steps_counted
        vllm = self.metrics.vllm
        if stats.num_steps > steps:
            vllm.iteration_tokens.observe(stats.num_computed_tokens - computed)
        if stats.num_preemptions > preemptions:
            vllm.num_preemptions.inc(stats.num_preemptions - preemptions)
        self._steps_counted = (stats.num_steps, stats.num_computed_tokens, stats.num_preemptions)


def _mirror(counters: tuple[Counter, ...], now: tuple[int, ...], counted: tuple[int, ...]) -> tuple[int, ...]:
    """Increment each Prometheus counter by what its engine counter gained since `counted`;
    returns `now`, the new counted values. (An increment by 0 would still take the counter's lock.)"""
    for counter, value, before in zip(counters, now, counted, strict=True):
        if value != before:
            counter.inc(value - before)
    return now
