"""Workloads: deterministic generators of `WorkloadRequest`s, described in YAML.

A workload file (see `loadtest/tandem/loadtest/workloads/*.yaml`) is a mapping with a `kind` and that kind's
parameters. Lengths are token counts, either fixed (`input_len: 128`) or drawn uniformly from
an inclusive range (`input_len: {min: 64, max: 256}`). Prompt token ids are drawn uniformly
from [0, vocab_size) (default 512, the tiny model's vocabulary).

Kinds:
- `random`: random prompt and output lengths (the baseline).
- `shared_prefix`: each prompt is a group's shared system prompt of
  floor(shared_fraction * input_len + 0.5) tokens (rounded half up) followed by a unique suffix;
  groups are assigned round-robin.
- `multi_turn`: conversations; turn k's prompt is turn k-1's prompt, a synthetic assistant reply
  of turn k-1's output length, then a new user message. Requests are ordered turn by turn.
- `interference`: a weighted mix of request classes, e.g. long prompts with short outputs
  mixed with short prompts with long decodes.

`generate(num_requests, seed)` is a pure function: the same seed gives the same requests.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

from tandem.loadtest.request import ChatMessage, Role, WorkloadRequest

DEFAULT_VOCAB_SIZE = 512


@dataclass(frozen=True)
class LengthRange:
    """A token count drawn uniformly from [min_tokens, max_tokens] (both inclusive)."""

    min_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"A length range needs 1 <= min <= max, got min={self.min_tokens}, max={self.max_tokens}.")

    @classmethod
    def parse(cls, value: Any, name: str) -> LengthRange:
        """From YAML: an int (fixed length) or a mapping `{min: a, max: b}`."""
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value, value)
        if isinstance(value, Mapping) and set(value) == {"min", "max"}:
            return cls(int(value["min"]), int(value["max"]))
        raise ValueError(f"{name} must be a token count or {{min: a, max: b}}, got {value!r}.")

    def sample(self, rng: np.random.Generator) -> int:
        """One length; consumes one draw from `rng` even when the length is fixed."""
        return int(rng.integers(self.min_tokens, self.max_tokens + 1))


class Workload(Protocol):
    """A request generator. `generate` is pure: the same arguments give the same requests."""

    def generate(self, num_requests: int, seed: int) -> tuple[WorkloadRequest, ...]:
        """Exactly `num_requests` requests, deterministic for `seed`."""
        ...


def _check_vocab(vocab_size: int) -> None:
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}.")


def _tokens(rng: np.random.Generator, count: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(0, vocab_size, size=count))


@dataclass(frozen=True)
class RequestClass:
    """One class of requests in a mix: a name, a relative weight and its lengths."""

    name: str
    weight: float
    input_len: LengthRange
    output_len: LengthRange

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("A request class needs a non-empty name.")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"Request class {self.name!r}: weight must be positive, got {self.weight}.")

    def sample(self, rng: np.random.Generator, request_id: str, vocab_size: int) -> WorkloadRequest:
        prompt = _tokens(rng, self.input_len.sample(rng), vocab_size)
        return WorkloadRequest(request_id, prompt, self.output_len.sample(rng), class_name=self.name)


@dataclass(frozen=True)
class RandomWorkload:
    """Random prompt and output lengths."""

    input_len: LengthRange
    output_len: LengthRange
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self) -> None:
        _check_vocab(self.vocab_size)

    def generate(self, num_requests: int, seed: int) -> tuple[WorkloadRequest, ...]:
        rng = np.random.default_rng(seed)
        only = RequestClass("random", 1.0, self.input_len, self.output_len)
        return tuple(only.sample(rng, f"req-{i}", self.vocab_size) for i in range(num_requests))


@dataclass(frozen=True)
class InterferenceWorkload:
    """A weighted mix of request classes; each request's class is drawn independently."""

    classes: tuple[RequestClass, ...]
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self) -> None:
        _check_vocab(self.vocab_size)
        names = [c.name for c in self.classes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"An interference workload needs one or more classes with distinct names, got {names}.")

    def generate(self, num_requests: int, seed: int) -> tuple[WorkloadRequest, ...]:
        rng = np.random.default_rng(seed)
        weights = np.array([c.weight for c in self.classes], dtype=np.float64)
        picks = rng.choice(len(self.classes), size=num_requests, p=weights / weights.sum())
        return tuple(self.classes[int(k)].sample(rng, f"req-{i}", self.vocab_size) for i, k in enumerate(picks))


def shared_prefix_len(shared_fraction: float, prompt_len: int) -> int:
    """Shared tokens of a prompt of `prompt_len` tokens: fraction * length, rounded half up."""
    return math.floor(shared_fraction * prompt_len + 0.5)


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """Prompts that start with one of `num_prefixes` shared system prompts.

    A prompt of n tokens is the first `shared_prefix_len(shared_fraction, n)` tokens of its
    group's system prompt and then a unique suffix whose first token differs from the system
    prompt's next token, so that the prompt shares exactly that many tokens with its group.
    """

    input_len: LengthRange
    output_len: LengthRange
    shared_fraction: float
    num_prefixes: int = 1
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self) -> None:
        _check_vocab(self.vocab_size)
        if not 0.0 <= self.shared_fraction <= 1.0:
            raise ValueError(f"shared_fraction must be within [0, 1], got {self.shared_fraction}.")
        if self.num_prefixes < 1:
            raise ValueError(f"num_prefixes must be >= 1, got {self.num_prefixes}.")

    def system_prompts(self, seed: int) -> tuple[tuple[int, ...], ...]:
        """The groups' system prompts (one token longer than the longest shared prefix)."""
        rng = np.random.default_rng(seed)
        length = shared_prefix_len(self.shared_fraction, self.input_len.max_tokens) + 1
        return tuple(_tokens(rng, length, self.vocab_size) for _ in range(self.num_prefixes))

    def generate(self, num_requests: int, seed: int) -> tuple[WorkloadRequest, ...]:
        systems = self.system_prompts(seed)
        rng = np.random.default_rng([seed, 1])  # a stream independent of the system prompts
        requests = []
        for i in range(num_requests):
            group = i % self.num_prefixes
            prompt_len = self.input_len.sample(rng)
            shared = shared_prefix_len(self.shared_fraction, prompt_len)
            suffix = list(_tokens(rng, prompt_len - shared, self.vocab_size))
            if suffix:  # first suffix token: any but the system prompt's next token
                first = int(rng.integers(0, self.vocab_size - 1))
                suffix[0] = first + (first >= systems[group][shared])
            requests.append(
                WorkloadRequest(
                    f"req-{i}",
                    systems[group][:shared] + tuple(suffix),
                    self.output_len.sample(rng),
                    class_name=f"prefix-{group}",
                )
            )
        return tuple(requests)


@dataclass(frozen=True)
class MultiTurnWorkload:
    """Conversations of `num_turns` turns; each turn's prompt extends the previous conversation.

    Turn 0 is a user message of `first_input_len` tokens. Turn k > 0 appends turn k-1's
    assistant reply (synthetic, of turn k-1's output length) and a new user message of
    `turn_input_len` tokens. Requests come turn by turn: turn 0 of every conversation, then
    turn 1, ...; a run cut short by `num_requests` drops late turns first.
    """

    first_input_len: LengthRange
    turn_input_len: LengthRange
    output_len: LengthRange
    num_turns: int
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self) -> None:
        _check_vocab(self.vocab_size)
        if self.num_turns < 1:
            raise ValueError(f"num_turns must be >= 1, got {self.num_turns}.")

    def _conversation(self, rng: np.random.Generator, conversation_id: int) -> list[WorkloadRequest]:
        messages: list[ChatMessage] = []
        turns = []
        reply: tuple[int, ...] = ()
        for turn in range(self.num_turns):
            if turn:
                messages.append(ChatMessage(Role.ASSISTANT, reply))
            user_len = (self.turn_input_len if turn else self.first_input_len).sample(rng)
            messages.append(ChatMessage(Role.USER, _tokens(rng, user_len, self.vocab_size)))
            max_tokens = self.output_len.sample(rng)
            prompt = tuple(t for message in messages for t in message.token_ids)
            turns.append(
                WorkloadRequest(
                    f"conv-{conversation_id}-turn-{turn}",
                    prompt,
                    max_tokens,
                    class_name=f"turn-{turn}",
                    conversation_id=conversation_id,
                    turn=turn,
                    messages=tuple(messages),
                )
            )
            reply = _tokens(rng, max_tokens, self.vocab_size)
        return turns

    def generate(self, num_requests: int, seed: int) -> tuple[WorkloadRequest, ...]:
        rng = np.random.default_rng(seed)
        conversations = [self._conversation(rng, c) for c in range(math.ceil(num_requests / self.num_turns))]
        by_turn = [conv[turn] for turn in range(self.num_turns) for conv in conversations]
        return tuple(by_turn[:num_requests])


WORKLOAD_KINDS: Mapping[str, type] = types.MappingProxyType(
    {
        "random": RandomWorkload,
        "shared_prefix": SharedPrefixWorkload,
        "multi_turn": MultiTurnWorkload,
        "interference": InterferenceWorkload,
    }
)


def _convert(name: str, value: Any) -> Any:
    if name.endswith("_len"):
        return LengthRange.parse(value, name)
    if name == "classes":
        if not isinstance(value, list):
            raise ValueError(f"classes must be a list of {{name, weight, input_len, output_len}}, got {value!r}.")
        return tuple(_build(RequestClass, item, "a request class") for item in value)
    return value


def _build(cls: type, data: Any, what: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a mapping, got {data!r}.")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {what}; allowed: {sorted(allowed)}.")
    try:
        return cls(**{key: _convert(key, value) for key, value in data.items()})
    except TypeError as err:  # a missing required parameter
        raise ValueError(f"Bad {what}: {err}.") from None


def workload_from_mapping(data: Mapping[str, Any]) -> Workload:
    """Build a workload from a parsed YAML mapping with a `kind` key."""
    params = dict(data)
    kind = params.pop("kind", None)
    if kind not in WORKLOAD_KINDS:
        raise ValueError(f"Workload kind must be one of {sorted(WORKLOAD_KINDS)}, got {kind!r}.")
    return _build(WORKLOAD_KINDS[kind], params, f"the {kind} workload")


def load_workload(path: Path) -> Workload:
    """Read a workload YAML file (see the module docstring for its format)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"Cannot read workload file {path}: {err}") from None
    try:
        return workload_from_mapping(data if isinstance(data, Mapping) else {"kind": None})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
