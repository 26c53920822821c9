"""Request bodies of the OpenAI API (with vLLM's extensions), validated once at the edge.

Who calls what, per request:
    1. `parse_body(raw, CompletionRequest | ChatCompletionRequest | ..., max_n)` turns the body
       into a frozen model or raises `OpenAIError` 400 (bad UTF-8, bad JSON, NaN/Infinity,
       wrong types, out-of-range values, unsupported features). Unknown fields are ignored.
    2. `prompt_inputs` (completions) or `chat_prompt` (chat) tokenizes the prompt(s).
    3. `resolve_max_tokens` checks the length against the context and picks the budget.
    4. `to_sampling(req, max_tokens, i)` builds the engine's `SamplingParams` of choice i of n,
       and `stop_strings(req)` the stop strings the gateway cuts the text at.

Types are strict, as OpenAI's are: "16" is not an integer and 1 is not a boolean.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tandem.common.request import SamplingParams
from tandem.engine.tokenizer import Tokenizer
from tandem.gateway.errors import OpenAIError, bad_request, context_length_exceeded

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt"})
TokenId = Annotated[int, Field(ge=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        for part in value:
            if not isinstance(part, dict):
                raise ValueError('content parts must be objects like {"type": "text", "text": "..."}')
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported; only 'text' parts are")
            if not isinstance(part.get("text"), str):
                raise ValueError("a 'text' content part needs a string 'text'")
        return value

    def for_template(self) -> dict[str, Any]:
        """The message as Tokenizer.apply_chat_template takes it; text parts joined by "\\n" (vLLM's string format)."""
        content = self.content if not isinstance(self.content, list) else "\n".join(p.text for p in self.content)
        fields = {
            "role": self.role,
            "content": content,
            "name": self.name,
            "tool_call_id": self.tool_call_id,
            "tool_calls": self.tool_calls,
        }
        return {key: value for key, value in fields.items() if value is not None}


class _GenerateBody(_Body):
    """Fields shared by completions and chat. `None` means "not given" for every nullable field."""

    model: str | None = None  # None: the served model
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 disables
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    n: int = Field(1, ge=1)  # null: 1
    stream: bool = False  # null: false
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else [None]
        if value is not None and not all(isinstance(s, str) for s in items):
            raise ValueError("stop must be a string or a list of strings")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("n", "stream", "echo", "logprobs", mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("n")
    @classmethod
    def _n_cap(cls, value: int, info: ValidationInfo) -> int:
        max_n = (info.context or {}).get("max_n")
        if max_n is not None and value > max_n:
            raise bad_request(f"n must be at most {max_n}, got {value}.", "n")
        return value

    @model_validator(mode="after")
    def _supported(self) -> _GenerateBody:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        if self.cache_salt is not None and not self.cache_salt:
            raise bad_request("cache_salt must be a non-empty string if provided.", "cache_salt")
        for name in ("frequency_penalty", "presence_penalty", "logit_bias"):
            if getattr(self, name):  # None, 0 and {} are the defaults
                raise bad_request(f"{name} is not supported.", name)
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerateBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # None: up to the context limit
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        shape = "prompt must be a string, a list of strings, a list of token ids or a list of token id lists"
        if not isinstance(value, list):
            raise ValueError(shape)
        if not value:
            raise ValueError("prompt must not be empty")
        if not (all(isinstance(p, str) for p in value) or all(_is_token_id(t) for t in value)):
            if not all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in value):
                raise ValueError(shape)
            if not all(value):
                raise ValueError("prompt token id lists must not be empty")
        return value

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo:
            raise bad_request("echo is not supported.", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported.", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of is not supported; use n.", "best_of")
        return self


class ChatCompletionRequest(_GenerateBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        if self.tools:
            raise bad_request("tools are not supported.", "tools")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise bad_request('response_format is not supported (only {"type": "text"}).', "response_format")
        _check_template_kwargs(self.chat_template_kwargs)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens; None: up to the context limit."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
    """vLLM's /tokenize: exactly one of `prompt` and `messages`. `add_special_tokens=None` means
    True for a prompt and False for messages (the chat template writes its own BOS), as vLLM."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("Provide exactly one of prompt and messages.", "prompt")
        _check_template_kwargs(self.chat_template_kwargs)
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]


Body = TypeVar("Body", bound=_Body)


def parse_body(raw: bytes, model_cls: type[Body], max_n: int) -> Body:
    """Decode, parse and validate a request body; OpenAIError 400 naming the problem otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(f"The request body is not valid UTF-8: {error.reason} at byte {error.start}.") from None
    constants: list[str] = []  # NaN / Infinity / -Infinity: not JSON, though Python's json reads them

    def constant(name: str) -> float:
        constants.append(name)
        return float(name)

    try:
        value = json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as error:
        raise bad_request(f"The request body is not valid JSON: {error}.") from None
    except RecursionError:
        raise bad_request("The request body is not valid JSON: it is nested too deeply.") from None
    except ValueError:  # an integer over Python's digit limit
        raise bad_request("The request body is not valid JSON: a number has too many digits.") from None
    if not isinstance(value, dict):
        raise bad_request(f"The request body must be a JSON object, got {_json_type(value)}.")
    try:
        # Validation first, so that a NaN in a known field is reported with its name.
        request = model_cls.model_validate(value, context={"max_n": max_n})
    except ValidationError as error:
        raise _validation_error(error) from None
    if constants:
        raise bad_request(f"The request body is not valid JSON: {constants[0]} is not a valid JSON number.")
    return request


def resolve_max_tokens(
    requested: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    kind: Literal["prompt", "messages"],
    param: str = "max_tokens",
) -> int:
    """The completion budget: `requested`, or all the context the prompt leaves when None."""
    if num_prompt_tokens >= max_model_len:
        raise context_length_exceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{num_prompt_tokens} input tokens. Please reduce the length of the input {kind}.",
            kind,
        )
    if requested is None:
        return max_model_len - num_prompt_tokens
    if requested < 1:
        raise bad_request(f"{param} must be at least 1, got {requested}.", param)
    if num_prompt_tokens + requested > max_model_len:
        raise context_length_exceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {kind}, {requested} in the "
            f"completion). Please reduce the length of the {kind} or completion.",
            param,
        )
    return requested


def prompt_inputs(req: CompletionRequest, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt: strings encoded with the tokenizer's special tokens (BOS)."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) for p in prompt]  # type: ignore[arg-type]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [list(p) for p in prompt]  # type: ignore[union-attr]
    for ids in prompts:
        check_token_ids(ids, vocab_size, "prompt")
    return prompts


def chat_prompt(req: ChatCompletionRequest | TokenizeRequest, tokenizer: Tokenizer) -> list[int]:
    """Render the chat template and tokenize it without special tokens (the template has BOS)."""
    messages = [m.for_template() for m in req.messages or ()]
    try:
        text = tokenizer.apply_chat_template(messages, req.add_generation_prompt, **(req.chat_template_kwargs or {}))
    except (ValueError, TypeError) as error:
        raise bad_request(f"The messages could not be rendered with the chat template: {error}", "messages") from None
    add_special = isinstance(req, TokenizeRequest) and bool(req.add_special_tokens)
    ids = tokenizer.encode(text, add_special_tokens=add_special)
    if not ids:
        raise bad_request("The prompt is empty after applying the chat template.", "messages")
    return ids


def tokenize_request(req: TokenizeRequest, tokenizer: Tokenizer) -> list[int]:
    """Token ids for /tokenize: the prompt's (with special tokens unless told not to) or the chat's."""
    if req.prompt is not None:
        return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    return chat_prompt(req, tokenizer)


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """400 unless every id is in [0, vocab_size) and there is at least one."""
    if not ids:
        raise bad_request(f"{param} must not be empty.", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of vocabulary (vocab size {vocab_size}).", param)


def to_sampling(req: CompletionRequest | ChatCompletionRequest, max_tokens: int, choice_index: int) -> SamplingParams:
    """Engine parameters of choice `choice_index` (0..n-1): seed + index, as vLLM's parallel sampling."""
    seed = None if req.seed is None else (req.seed + choice_index - INT64_MIN) % 2**64 + INT64_MIN
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=seed,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )


def stop_strings(req: CompletionRequest | ChatCompletionRequest) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def _check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs or {}))
    if reserved:
        raise bad_request(f"chat_template_kwargs cannot set {', '.join(reserved)}.", "chat_template_kwargs")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _validation_error(error: ValidationError) -> OpenAIError:
    """The first pydantic error as OpenAI words it: param is the field path, e.g. messages[0].role."""
    first = error.errors(include_url=False)[0]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{path}'.", path)
    message = first["msg"].removeprefix("Value error, ").rstrip(".")
    kind = "type" if first["type"].endswith("_type") else "value"
    return bad_request(f"Invalid {kind} for '{path}': {message}.", path or None)
