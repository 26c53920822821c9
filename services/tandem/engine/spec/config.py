"""`--speculative-config`: vLLM's JSON shape, parsed and validated once.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    {"method": "draft_model", "model": "/path/to/draft", "num_speculative_tokens": 4}

`disable_by_batch_size` (vLLM's name) turns speculation off for a step whose batch holds more
running sequences than that. Every error names the field. No torch here: the engine config
validates the flag without loading a backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SPEC_METHODS: tuple[str, ...] = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
_FIELDS = frozenset(
    {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model", "disable_by_batch_size"}
)


class SpeculativeConfigError(ValueError):
    """A bad `--speculative-config`; the message names the field."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None  # ngram only
    prompt_lookup_max: int | None = None  # ngram only
    model: str | None = None  # draft_model only: a local Hugging Face directory
    disable_by_batch_size: int | None = None

    @staticmethod
    def parse(text: str) -> SpeculativeConfig:
        """Parse the flag's JSON text; raises `SpeculativeConfigError` naming the field."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpeculativeConfigError(f"speculative config is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SpeculativeConfigError("speculative config must be a JSON object")
        return SpeculativeConfig.from_dict(raw)

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> SpeculativeConfig:
        unknown = sorted(set(raw) - _FIELDS)
        if unknown:
            raise SpeculativeConfigError(
                f"speculative config: unknown field {unknown[0]!r}; known fields are {sorted(_FIELDS)}"
            )
        method = raw.get("method")
        if method not in SPEC_METHODS:
            raise SpeculativeConfigError(f"speculative config: 'method' must be one of {SPEC_METHODS}, got {method!r}")
        k = _int(raw, "num_speculative_tokens", required=True)
        assert k is not None
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise SpeculativeConfigError(
                f"speculative config: 'num_speculative_tokens' must be in [1, {MAX_SPECULATIVE_TOKENS}], got {k}"
            )
        disable_by = _int(raw, "disable_by_batch_size")
        if disable_by is not None and disable_by < 1:
            raise SpeculativeConfigError(f"speculative config: 'disable_by_batch_size' must be >= 1, got {disable_by}")
        if method == "ngram":
            if "model" in raw:
                raise SpeculativeConfigError("speculative config: 'model' is for method 'draft_model', not 'ngram'")
            lo, hi = _int(raw, "prompt_lookup_min"), _int(raw, "prompt_lookup_max")
            # vLLM's defaults: both 5 when neither is given, else the one given for both
            lo, hi = (
                (5, 5) if lo is None and hi is None else (lo if lo is not None else hi, hi if hi is not None else lo)
            )
            assert lo is not None and hi is not None
            if lo < 1:
                raise SpeculativeConfigError(f"speculative config: 'prompt_lookup_min' must be >= 1, got {lo}")
            if hi < lo:
                raise SpeculativeConfigError(
                    f"speculative config: 'prompt_lookup_max' ({hi}) must be >= 'prompt_lookup_min' ({lo})"
                )
            return SpeculativeConfig(method, k, lo, hi, None, disable_by)
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            if name in raw:
                raise SpeculativeConfigError(f"speculative config: {name!r} is for method 'ngram', not 'draft_model'")
        model = raw.get("model")
        if not isinstance(model, str) or not model:
            raise SpeculativeConfigError(
                "speculative config: method 'draft_model' needs 'model', the draft's local Hugging Face directory"
            )
        return SpeculativeConfig(method, k, None, None, model, disable_by)

    def to_json(self) -> str:
        """Canonical JSON that `parse` reads back to an equal config."""
        out: dict[str, Any] = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens}
        for name in ("prompt_lookup_min", "prompt_lookup_max", "model", "disable_by_batch_size"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return json.dumps(out, sort_keys=True)


def _int(raw: dict[str, Any], name: str, required: bool = False) -> int | None:
    value = raw.get(name)
    if value is None:
        if required:
            raise SpeculativeConfigError(f"speculative config: {name!r} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpeculativeConfigError(f"speculative config: {name!r} must be an integer, got {value!r}")
    return value
