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
    logits of every prompt position (for scoring and exactness checks). `structured_output`
    constrains every generated token (the first one too) to a grammar.
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

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


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
class Request:
    """A request as a worker receives it: immutable. `cache_salt` (optional, per tenant)
    goes into the block hashes so that two tenants never share cache entries. `priority`
    (vLLM's field) orders a worker's waiting queue: lower is more important; under overload
    a queued request of a larger value is shed first."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    cache_salt: str | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority must be an integer, got {self.priority!r}")
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {self.priority}")
