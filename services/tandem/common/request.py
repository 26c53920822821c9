"""The request and its nouns: what a client asked, as every package sees it (DESIGN.md section 1).

A `Request` is immutable: prompt token ids plus `SamplingParams` (which validate themselves
at construction). What a peer sends is checked by the codec (`request_from_proto`: sizes and
token ranges), and the engine checks a prompt against its model (vocabulary, context length)
when it admits it. The gateway builds a request, the codec carries it to workers, and a
worker's `Sequence` holds it. `FinishReason` and `TokenLogprob` describe what came out. This module
imports nothing else from the project (the leaf layer).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

# `Request.priority` bounds (a signed 32-bit range): lower is more important, as in vLLM.
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1


# `StructuredOutput.kind` values (issue 19): what `spec` holds for each.
STRUCTURED_OUTPUT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, compiled by the worker (`tandem.engine.grammar`).

    `kind` is one of `STRUCTURED_OUTPUT_KINDS`; `spec` is the JSON schema as canonical JSON
    text ("json_schema"), "" ("json_object": any JSON object), the regex ("regex"), the choices
    as a JSON list of strings ("choice"), or the EBNF grammar ("grammar"). Whitespace is not
    an option: JSON is always generated compact (no whitespace between tokens, separators ","
    and ":"), so that a weak model cannot emit spaces until `max_tokens`.
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_OUTPUT_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_OUTPUT_KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise ValueError(f"structured output spec must be a string, got {type(self.spec).__name__}")
        if self.kind == "json_object" and self.spec:
            raise ValueError("structured output of kind 'json_object' takes no spec")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"structured output of kind {self.kind!r} needs a non-empty spec")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each generated token and when to stop.

    `temperature == 0` is greedy. `top_k=None` and `top_p=1.0` disable those filters.
    `seed` makes sampling reproducible per (seed, position), independent of the batch.
    `logprobs=None` returns no logprobs; `logprobs=k` returns the chosen token's logprob and
    the `k` most likely alternatives (k may be 0). `return_prompt_logits` keeps the float32
    logits of every prompt position (for scoring and exactness checks).

    Sampling controls (vLLM's semantics, engine/logits_processors.py), applied to the logits
    before temperature, top-k, top-p and greedy argmax: `repetition_penalty` (1.0: off)
    divides positive / multiplies negative logits of tokens seen in the prompt or output;
    `frequency_penalty` subtracts penalty * count in the output; `presence_penalty`
    subtracts the penalty once per token in the output; `logit_bias` adds (token id, bias)
    pairs, sorted by token id; `min_tokens` masks EOS and `stop_token_ids` until that many
    tokens were generated; `bad_words_token_ids` masks the last token of each sequence when
    the output ends with the sequence's other tokens. `prompt_logprobs=k` returns each
    prompt token's logprob (after the first) with the `k` most likely alternatives.
    `max_tokens == 0` computes the prompt only (echo with logprobs): no token is generated.
    `structured_output` constrains every generated token (the first one too) to a grammar.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    return_prompt_logits: bool = False
    structured_output: StructuredOutput | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._check_controls()

    def _check_controls(self) -> None:
        """The sampling controls' ranges (vLLM's); normalises `logit_bias` and bad words to tuples."""
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        bias = tuple(sorted((int(t), float(b)) for t, b in self.logit_bias))
        if len({t for t, _ in bias}) != len(bias):
            raise ValueError("logit_bias must not name a token id twice")
        if any(t < 0 or not math.isfinite(b) or not -100.0 <= b <= 100.0 for t, b in bias):
            raise ValueError("logit_bias maps token ids >= 0 to biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        words = tuple(tuple(int(t) for t in word) for word in self.bad_words_token_ids)
        if any(not word or min(word) < 0 for word in words):
            raise ValueError("bad_words_token_ids must be non-empty sequences of token ids >= 0")
        object.__setattr__(self, "bad_words_token_ids", words)
        k = self.prompt_logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 20):
            raise ValueError(f"prompt_logprobs must be None or an integer in [0, 20], got {k!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_controls(self) -> bool:
        """True if a logits processor applies (penalties, bias, min_tokens, bad words)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.bad_words_token_ids
        )

    @property
    def needs_prompt_logits(self) -> bool:
        """True if every prompt position's logits are computed (no prefix-cache reuse)."""
        return self.return_prompt_logits or self.prompt_logprobs is not None


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the model's maximum length
    ABORT = "abort"
    HANDOFF = "handoff"  # prefill role: first token sampled, KV held for a decode worker


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's logprob and the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Logprobs of prompt tokens 1..n-1 (token 0 has none), from the raw logits: entry i is
    token i+1's `TokenLogprob` (its top-k alternatives in `top`) and `ranks[i]` that token's
    rank (1: the most likely)."""

    logprobs: tuple[TokenLogprob, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.ranks):
            raise ValueError(f"{len(self.logprobs)} prompt logprobs but {len(self.ranks)} ranks")


@dataclass(frozen=True)
class Request:
    """A request as a worker receives it: immutable. `cache_salt` (optional, per tenant)
    goes into the block hashes so that two tenants never share cache entries. `priority`
    (vLLM's field) orders a worker's waiting queue: lower is more important; under overload
    a queued request of a larger value is shed first.

    `num_generated`: the trailing `num_generated` tokens of `prompt_token_ids` are output an
    earlier attempt already produced (a migration's replay, gateway/migration.py); 0 for a
    fresh request. A worker computes them as it computes the prompt (the KV hand-off and the
    block hashes cover every token), but counts them as output: penalties, bad words,
    `min_tokens`, `max_tokens` and the grammar see them as generated."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    cache_salt: str | None = None
    priority: int = 0
    num_generated: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority must be an integer, got {self.priority!r}")
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {self.priority}")
        n = self.num_generated
        # 0 always holds (an empty prompt is the engine's and the codec's error, not this one)
        if isinstance(n, bool) or not isinstance(n, int) or (n != 0 and not 0 < n < len(self.prompt_token_ids)):
            raise ValueError(
                f"num_generated must be an integer in [0, {len(self.prompt_token_ids)}) "
                f"(fewer than the {len(self.prompt_token_ids)} prompt tokens), got {n!r}"
            )

    @property
    def original_prompt_token_ids(self) -> tuple[int, ...]:
        """The client's prompt: every token but the `num_generated` generated ones."""
        return self.prompt_token_ids[: len(self.prompt_token_ids) - self.num_generated]

    @property
    def generated_token_ids(self) -> tuple[int, ...]:
        """The tokens an earlier attempt generated (the last `num_generated`)."""
        return self.prompt_token_ids[len(self.prompt_token_ids) - self.num_generated :]
