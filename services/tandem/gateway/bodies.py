"""Request bodies of the OpenAI API (with vLLM's extensions) as frozen pydantic models.

Each model validates its own fields (types, ranges, shapes, unsupported features) and raises
`OpenAIError` 400 naming the parameter for the cases pydantic cannot word; `protocol.parse_body`
turns pydantic's own errors into OpenAI's wording. Unknown fields are ignored. Nullable fields
use `None` for "not given".

Types are strict, as OpenAI's are: "16" is not an integer and 1 is not a boolean.

Every integer that travels to a worker is bounded here by what the wire and the worker accept
(`tandem.common.codec`, `tandem.common.request`), so that an absurd value is a 400 naming the
parameter, never a failure in the protobuf conversion.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationInfo, field_validator, model_validator

from tandem.common.codec import MAX_STOP_TOKEN_IDS, TOKEN_ID_LIMIT
from tandem.common.request import MAX_PRIORITY, MIN_PRIORITY
from tandem.gateway.errors import bad_request

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX = 2**32 - 1  # top_k travels as a uint32
MAX_LOGPROBS = 20
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt"})
TokenId = Annotated[int, Field(ge=0)]
WireTokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]  # a token id a worker accepts


class Body(BaseModel):
    """Base of every request body: unknown fields ignored, strict types, no NaN/Infinity, frozen."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


class StreamOptions(Body):
    include_usage: bool = False


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionDefinition(Body):
    """A function the model may call; `parameters` is its arguments' JSON schema."""

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(Body):
    """`response_format.json_schema`: the output must validate against `schema`."""

    model_config = ConfigDict(populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Body):
    """vLLM's `structured_outputs`: exactly one constraint (`structured.from_vllm`)."""

    model_config = ConfigDict(populate_by_name=True)
    json_spec: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class ChatMessage(Body):
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
            "tool_calls": None if self.tool_calls is None else [_template_call(c) for c in self.tool_calls],
        }
        return {key: value for key, value in fields.items() if value is not None}


class _GenerateBody(Body):
    """Fields shared by completions and chat. `None` means "not given" for every nullable field."""

    model: str | None = None  # None: the served model
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=UINT32_MAX)  # vLLM: -1 or 0 disables
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[WireTokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    n: int = Field(1, ge=1)  # null: 1
    stream: bool = False  # null: false
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Sampling controls (OpenAI's ranges; vLLM's semantics: gateway/controls.py)
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted once per earlier occurrence of a token in the output."
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted from every token already in the output."
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="Token id (as a string) to a bias in [-100, 100], added to its logit."
    )
    repetition_penalty: float | None = Field(
        None, gt=0, description="vLLM's: divides positive (multiplies negative) logits of prompt and output tokens."
    )
    min_tokens: int = Field(0, ge=0, le=UINT32_MAX, description="vLLM's: EOS and stop tokens are banned before this.")
    bad_words: list[str] | None = Field(None, description="vLLM's: words that are never generated.")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="vLLM's: logprobs of the prompt tokens, with this many alternatives."
    )
    # vLLM's; lower is more important; None: the key's default
    priority: int | None = Field(None, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    # OpenAI's end-user id; the session key of session affinity with `--session-key user`
    user: str | None = None
    # structured output (structured.py): OpenAI's, vLLM's, and vLLM's older guided_* names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else [None]
        if value is not None and not all(isinstance(s, str) for s in items):
            raise ValueError("stop must be a string or a list of strings")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            try:
                int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias") from None
        return value

    @field_validator("n", "stream", "echo", "logprobs", "min_tokens", mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

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
        if self.prompt_logprobs is not None and self.stream:
            raise bad_request("prompt_logprobs are not available when stream is true.", "prompt_logprobs")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerateBody):
    # `_prompt_shape` checks the exact shape (every item's type) in one pass over the prompt, so
    # pydantic's union is skipped: it would walk a token-id prompt once more per member it tries
    # (about 17 us for 64 ids, more than the rest of the body). The schema stays the union's.
    prompt: SkipValidation[str | list[str] | list[int] | list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)  # None: up to the context limit; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="Return the prompt before the completion (with max_tokens 0: alone).")
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
        if not (all(isinstance(p, str) for p in value) or _all_token_ids(value)):
            if not all(isinstance(p, list) and _all_token_ids(p) for p in value):
                raise ValueError(shape)
            if not all(value):
                raise ValueError("prompt token id lists must not be empty")
        return value

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
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
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        _check_template_kwargs(self.chat_template_kwargs)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens; None: up to the context limit."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(Body):
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


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[TokenId]


def _check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs or {}))
    if reserved:
        raise bad_request(f"chat_template_kwargs cannot set {', '.join(reserved)}.", "chat_template_kwargs")


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool call as chat templates expect it: arguments as a dict, not
    JSON text (transformers' convention, which vLLM follows); arguments that are not a JSON
    object stay as they are."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except (json.JSONDecodeError, RecursionError):
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _all_token_ids(values: list[Any]) -> bool:
    """Whether every item is an int and none a bool (True for no items). JSON gives exact ints,
    checked in one C-level pass over their types; any other type is checked item by item."""
    return set(map(type, values)) <= {int} or all(_is_token_id(t) for t in values)
