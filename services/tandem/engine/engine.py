"""The engine: a model, its paged KV cache, a batcher and a sampler. No networking. The
model, the cache and the speculator are built by engine/parts.py; the engine owns them.

Workers drive it through the step-level API from their one step-loop thread:
1. `add_request(request_id, prompt_token_ids, sampling)` validates and queues a sequence.
   With `max_waiting`, a full waiting queue sheds a less important request or refuses
   (`admission.py`).
2. `step()` plans a batch, runs the model once, samples, and returns per-request deltas.
3. `abort(request_id)` finishes a sequence at once and frees its blocks.
4. `take_aborted()` hands out the final output (finish reason ABORT) of every sequence
   finished outside a step (aborted, shed, or its grammar failed to compile), so that its
   stream can end at once.
Structured output (`grammar/`): a constrained request waits, holding no blocks, until its
grammar has compiled on the compiler's threads (`_admit_compiled`, at each step); other
requests never wait. Its logits row is masked before sampling, and its matcher advances on
each sampled token.
`generate()` is the offline API over the same loop. Nothing here is thread-safe: one owner.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from pathlib import Path

from tandem.common.layout import KVLayout
from tandem.common.request import FinishReason, SamplingParams
from tandem.engine.admission import sequences_to_shed, shed_message
from tandem.engine.batcher import Batcher
from tandem.engine.config import EngineConfig
from tandem.engine.grammar.compiler import GrammarCompiler
from tandem.engine.grammar.matchers import GrammarMatchers
from tandem.engine.grammar.waiting import GrammarWaits
from tandem.engine.logits_processors import TokenHistory
from tandem.engine.outputs import EngineStats, GenerationOutput, HeldKV, RequestOutput, Reservation
from tandem.engine.parts import LoadedModel, PagedCache, build_speculator
from tandem.engine.prompt_logprobs import keep_prompt_logits
from tandem.engine.request_limits import RequestLimits
from tandem.engine.sampler import Sampler
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.engine.spec.verification import verify_chunks
from tandem.engine.step_plan import BatcherConfig, StepPlan

# With nothing to run but requests waiting for their grammar, a step waits this long for one.
GRAMMAR_POLL_S = 0.005


class Engine:
    def __init__(self, model_dir: Path, config: EngineConfig, kv_shared_dir: str | None = None) -> None:
        """`kv_shared_dir`: a CPU KV cache lives in a shared pool file there (same-host KV
        sources, engine.kv_cache.allocate_shared); other devices ignore it."""
        self.config = config
        loaded = LoadedModel.load(Path(model_dir), config)
        self.model_dir, self.model_config = loaded.model_dir, loaded.model_config
        self.max_model_len, self.device = loaded.max_model_len, loaded.device
        self.model, self.quant_plan, self.weight_bytes = loaded.model, loaded.quant_plan, loaded.weight_bytes
        cache = PagedCache.allocate(loaded, config, kv_shared_dir)
        self.kv_spec, self.kv_scales, self.pool = cache.kv_spec, cache.kv_scales, cache.pool
        self.kv_caches, self.backend, self.runner = cache.kv_caches, cache.backend, cache.runner
        self.speculator = build_speculator(config, loaded, cache)
        num_draft_positions = self.speculator.config.num_speculative_tokens if self.speculator else 0
        self.stats = EngineStats(spec_accepted_per_position=[0] * num_draft_positions)
        self.batcher = Batcher(
            BatcherConfig(
                block_size=config.block_size,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_num_seqs=config.max_num_seqs,
                max_prefill_chunk_tokens=config.max_prefill_chunk_tokens,
            ),
            self.pool,
            self.speculator,
        )
        self.sampler = Sampler(config.seed)
        self.grammars = GrammarCompiler(self.model_dir, self.model_config.vocab_size, self.model_config.eos_token_ids)
        self.matchers = GrammarMatchers(self.model_config.vocab_size)
        # constrained sequences whose grammar is compiling: not in the batcher, no blocks
        self._awaiting = GrammarWaits(self.matchers)
        self.model_id = config.model_id or self.model_dir.name
        self._limits = RequestLimits(
            self.model_id, self.model_config.vocab_size, self.max_model_len, config.block_size, self.pool.num_blocks
        )
        self._seqs: dict[str, Sequence] = {}
        self.held: dict[str, HeldKV] = {}
        self._aborted: list[RequestOutput] = []  # finished outside a step, until `take_aborted`
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **options: object) -> Engine:
        """Load a local HF checkpoint (the generated tiny model when `path` is None)."""
        config = EngineConfig(**options)  # type: ignore[arg-type]
        if path is None:
            from tandem.engine.tiny_model import ensure_tiny_model

            path = ensure_tiny_model()
        return cls(Path(path), config)

    # ---- step-level API ------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        sampling: SamplingParams,
        cache_salt: str | None = None,
        generated_token_ids: Seq[int] = (),
        hand_off: bool = False,
        *,
        priority: int = 0,
        max_waiting: int | None = None,
    ) -> None:
        """Queue a request. `generated_token_ids` are tokens already produced elsewhere (a
        migration replay's generated tokens, `Request.generated_token_ids`, then the first
        token from a prefill worker); they are recomputed, not re-sampled, and count as output
        (penalties, bad words, min/max tokens; the grammar matcher replays them). With
        `hand_off`, the sequence stops after its first token and its blocks are kept in
        `held` (finish reason HANDOFF) until `release_held`. `priority`: lower is more
        important. With `max_waiting`, a full waiting queue sheds less important queued
        requests or raises `WaitingQueueFullError` (admission.py)."""
        self._check_new_id(request_id)
        seq = self._limits.new_sequence(
            request_id, prompt_token_ids, sampling, cache_salt, generated_token_ids, hand_off, priority
        )
        so = sampling.structured_output
        grammar = self.grammars.submit(so) if so is not None else None
        if grammar is not None and grammar.done():
            self._awaiting.start(seq, grammar)  # raises GrammarError (a ValueError)
        self._make_room(seq.priority, max_waiting)
        self._seqs[request_id] = seq
        if grammar is not None and request_id not in self.matchers:
            self._awaiting.add(seq, grammar)
        else:
            self.batcher.add(seq)

    def _admit_compiled(self, block_s: float) -> None:
        """Queue the awaiting sequences whose grammar compiled, and fail (finish reason ABORT,
        `error` set) those whose compile failed. Waits up to `block_s` for one to finish."""
        for seq, error in self._awaiting.compiled(block_s):
            if error is not None:
                self._finish_outside_step(seq, None, error=error)
            else:
                self.batcher.add(seq)

    def _make_room(self, priority: int, max_waiting: int | None) -> None:
        if max_waiting is None or self.num_waiting < max_waiting:
            return
        for victim in sequences_to_shed(priority, self.num_waiting, max_waiting, self.batcher.shed_candidates()):
            self._finish_outside_step(victim, shed_message(victim.priority, priority))

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._seqs or request_id in self.held:
            raise ValueError(f"request id {request_id!r} is already active")

    # ---- prefill role --------------------------------------------------------------------
    def release_held(self, request_id: str) -> bool:
        """Unpin a handed-off prompt's blocks (they stay in the prefix cache)."""
        held = self.held.pop(request_id, None)
        if held is None:
            return False
        self.pool.free(held.block_ids[::-1])
        return True

    # ---- decode role ---------------------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        sampling: SamplingParams,
        first_token: int,
        cache_salt: str | None = None,
        *,
        generated_token_ids: Seq[int] = (),
        priority: int = 0,
        max_waiting: int | None = None,
    ) -> Reservation | None:
        """Reserve blocks for a prompt whose KV will be pulled: the prompt, then
        `generated_token_ids` (a migration replay's, counted as output as in `add_request`),
        every token but `first_token` (`Sequence.num_handoff_tokens`). None if the pool is too
        full now; the caller then uses `add_request` (local prefill) instead. `priority` and
        `max_waiting` as for `add_request`: a reserved sequence counts as waiting."""
        generated = [*generated_token_ids, first_token]
        self._check_new_id(request_id)
        seq = self._limits.new_sequence(request_id, prompt_token_ids, sampling, cache_salt, generated, False, priority)
        so = sampling.structured_output
        if so is not None:
            grammar = self.grammars.submit(so)
            if not grammar.done():
                return None  # the caller queues it with `add_request`, where it waits for the compile
            self._awaiting.start(seq, grammar)
        self._make_room(seq.priority, max_waiting)
        if not self.batcher.reserve(seq):
            self.matchers.drop(request_id)
            return None
        self._seqs[request_id] = seq
        self.stats.num_prefix_hit_tokens += seq.num_cached_tokens
        num_full_blocks = seq.num_handoff_tokens // self.config.block_size
        return Reservation(request_id, tuple(seq.block_table), seq.num_cached_blocks, num_full_blocks)

    def commit(self, request_id: str) -> None:
        """The pull filled the reservation's full blocks: the sequence joins the batch with
        them computed (a partial last block is recomputed here, `Batcher.commit`)."""
        self.batcher.commit(self._seqs[request_id])

    def unreserve(self, request_id: str) -> None:
        """The pull failed: free the reservation and recompute the prompt locally."""
        self.batcher.unreserve(self._seqs[request_id])

    def abort(self, request_id: str) -> bool:
        """Finish a request now (queued, running, reserved or held) and free its blocks.
        False if it is not active."""
        if self.release_held(request_id):
            return True
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self._finish_outside_step(seq, None)
        return True

    def _finish_outside_step(self, seq: Sequence, shed: str | None, error: str | None = None) -> None:
        """Abort a live sequence (shed under overload when `shed` is its message; failed when
        `error` is) and keep its final output for `take_aborted`."""
        del self._seqs[seq.request_id]
        self.matchers.drop(seq.request_id)
        if not self._awaiting.discard(seq.request_id):
            self.batcher.finish(seq, FinishReason.ABORT)
        else:  # never reached the batcher
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ABORT
        self._count_finish(FinishReason.ABORT)
        self._aborted.append(
            RequestOutput(
                seq.request_id,
                (),
                (),
                FinishReason.ABORT,
                seq.first_scheduled_s,
                seq.num_cached_tokens,
                shed,
                error=error,
            )
        )

    def take_aborted(self) -> list[RequestOutput]:
        """The final outputs of the sequences aborted or shed since the last call (finish
        reason ABORT, `shed_message` set for a shed one), in order. The step loop calls it
        after each batch of commands; an offline caller may ignore it."""
        aborted, self._aborted = self._aborted, []
        return aborted

    def has_unfinished(self) -> bool:
        return self.batcher.has_work or bool(self._awaiting)

    def step(self) -> list[RequestOutput]:
        self._admit_compiled(block_s=0 if self.batcher.has_work else GRAMMAR_POLL_S)
        plan = self.batcher.schedule()
        self.stats.num_preemptions += len(plan.preempted)
        self.stats.num_prefix_hit_tokens += plan.num_prefix_hit_tokens
        if not plan.chunks:
            return []
        now_s = time.monotonic()
        for chunk in plan.chunks:
            if chunk.seq.first_scheduled_s is None:
                chunk.seq.first_scheduled_s = now_s
        result = self.runner.execute(plan)
        sampling_chunks = [c for c in plan.chunks if c.samples]
        plain_chunks = [c for c in sampling_chunks if c.draft is None]
        self.matchers.mask(result.sample_logits, [c.seq.request_id for c in plain_chunks])
        tokens, logprobs = self.sampler.sample(
            result.sample_logits,
            [c.seq.sampling for c in plain_chunks],
            [c.seq.num_tokens for c in plain_chunks],
            [TokenHistory(c.seq.prompt_token_ids, c.seq.output_token_ids) for c in plain_chunks],
            self.model_config.eos_token_ids,
        )
        verified = verify_chunks(plan.chunks, result.verify_logits, self.sampler.generator, self.stats)
        for request_id, logits in result.prompt_logits.items():
            keep_prompt_logits(self._seqs[request_id], logits)
        first_samples = {c.seq.request_id for c in sampling_chunks if c.seq.num_output_tokens == 0}
        self._count_step(plan)
        sampled = {c.seq.request_id: (t, lp) for c, t, lp in zip(plain_chunks, tokens, logprobs)}
        # where each sampling sequence's new tokens and logprobs start
        before = {c.seq.request_id: (c.seq.num_tokens, len(c.seq.logprobs)) for c in sampling_chunks}
        # constrained sequences never carry a draft (spec/skip.py), so they are all plain chunks
        terminated = [c.seq for c, t in zip(plain_chunks, tokens) if self.matchers.accept(c.seq.request_id, t)]
        self.batcher.update(plan, sampled, self.model_config.eos_token_ids, verified)
        for seq in terminated:  # the grammar accepted a stop token (only reached with ignore_eos)
            if not seq.is_finished:
                self.batcher.finish(seq, FinishReason.STOP)
        bs = self.config.block_size
        for chunk in sampling_chunks:
            seq = chunk.seq
            if seq.finish_reason is FinishReason.HANDOFF:
                num_full = seq.num_handoff_tokens // bs
                self.held[seq.request_id] = HeldKV(
                    tuple(seq.block_table), seq.num_handoff_tokens, tuple(seq.block_hashes(bs)[:num_full])
                )
        outputs: list[RequestOutput] = []
        num_generated = 0
        for chunk in sampling_chunks:
            seq = chunk.seq
            num_tokens_before, num_logprobs_before = before[seq.request_id]
            num_generated += seq.num_tokens - num_tokens_before
            outputs.append(
                RequestOutput(
                    seq.request_id,
                    tuple(seq.token_ids[num_tokens_before:]),
                    tuple(seq.logprobs[num_logprobs_before:]),
                    seq.finish_reason,
                    seq.first_scheduled_s,
                    seq.num_cached_tokens,
                    prompt_logprobs=seq.full_prompt_logprobs() if seq.request_id in first_samples else None,
                )
            )
            if seq.is_finished:
                del self._seqs[seq.request_id]
                self.matchers.drop(seq.request_id)
                self._count_finish(seq.finish_reason)
        self.stats.num_generated_tokens += num_generated
        return outputs

    def _count_step(self, plan: StepPlan) -> None:
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += plan.num_tokens
        for chunk in plan.chunks:
            seq = chunk.seq
            start = seq.num_computed_tokens
            self.stats.num_prompt_tokens_computed += max(
                0, min(start + chunk.num_tokens, seq.num_prompt_tokens) - start
            )

    def _count_finish(self, reason: FinishReason | None) -> None:
        key = reason.value if reason else "unknown"
        self.stats.finished[key] = self.stats.finished.get(key, 0) + 1

    # ---- offline API ---------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[Seq[int]],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Run every prompt through the continuous batcher at once; outputs in input order."""
        params = sampling if isinstance(sampling, Seq) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        seqs: list[Sequence] = []
        for p in params:  # a bad grammar raises here, before anything is queued
            if p.structured_output is not None:
                self.grammars.submit(p.structured_output).result()
        for request_id, prompt, p in zip(ids, prompts, params):
            self.add_request(request_id, prompt, p)
            seqs.append(self._seqs[request_id])
        while any(not s.is_finished for s in seqs):
            self.step()
        return [s.generation_output() for s in seqs]

    # ---- introspection -------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.pool.check_integrity()

    @property
    def kv_layout(self) -> KVLayout:
        """The layout of this engine's KV cache: what a KV hand-off into or out of it must match."""
        mc = self.model_config
        return KVLayout(
            architecture=mc.architecture,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=str(mc.dtype).removeprefix("torch."),
            block_size=self.config.block_size,
            kv_dtype=str(self.kv_spec.dtype).removeprefix("torch."),
            kv_scales=self.kv_scales.digest if self.kv_scales else "none",
        )

    @property
    def num_requests(self) -> int:
        """Live requests: queued, reserved (a KV pull is filling their blocks), ready or running.
        Held prompts (a lease, prefill role) are not requests any more; see `held`."""
        return len(self._seqs)

    @property
    def num_waiting(self) -> int:
        """Live requests not running: queued, reserved (a KV pull is filling their blocks) or
        ready. What `max_waiting` bounds."""
        return len(self._seqs) - len(self.batcher.running)

    def is_drained(self) -> bool:
        """No queued, running, reserved or held sequence, and every block free."""
        return not self._seqs and not self.held and self.pool.num_used_blocks == 0
